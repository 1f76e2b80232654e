import { ISessionContext, IWidgetTracker, Notification } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { Kernel, ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

/** The GPU pool settings that reach kernels. */
export interface IKernelPreferences {
  /** "H100" or "H100:2"; '' for %%gpu's own default. */
  defaultShape: string;
  /** Seconds a pool kernel may idle before it is suspended; 0 for the gateway's default. */
  idleTimeout: number;
}

/** TYPE or TYPE:COUNT, as `%gpu default` takes it (jupyter_ext/shapes.py). */
const SHAPE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}(:[1-9][0-9]{0,2})?$/;
const MAX_IDLE_TIMEOUT = 7 * 24 * 3600;

/**
 * The line that makes a local kernel's `%%gpu` follow these settings ('' when they are all
 * defaults, which is where a fresh kernel starts). `--reset` first, so that the line says
 * everything: a setting cleared in Lab is cleared in the kernel too.
 */
export function gpuDefaultLine(preferences: IKernelPreferences): string {
  const shape = preferences.defaultShape.trim();
  const parts: string[] = [];
  if (SHAPE.test(shape)) {
    parts.push(shape);
  }
  const idle = Math.floor(preferences.idleTimeout || 0);
  if (idle > 0 && idle <= MAX_IDLE_TIMEOUT) {
    parts.push(`--idle-timeout ${idle}`);
  }
  return parts.length ? ['%gpu default --reset', ...parts].join(' ') : '';
}

/** A widget with a kernel session: a notebook (or a console). */
type SessionWidget = Widget & { sessionContext: ISessionContext };

interface IKernelState {
  kernel: Kernel.IKernelConnection | null;
  /** The line this kernel (since its last restart) has run; '' for none. */
  sent: string;
}

/**
 * Applies the GPU pool settings to this Lab's kernels:
 *
 * - `defaultShape` and `idleTimeout` reach the user's own local Python kernels (those whose
 *   kernelspec is not one of the pool's) as a silent `%gpu default ...` line, run when the
 *   kernel starts or restarts and when a setting changes; pool kernels get nothing (a suspended
 *   one would resume, and bill, for it).
 * - `idleTimeout` goes to this server (PUT /gpupool/preferences), which gives it to every pool
 *   kernel a session starts from then on, as KERNEL_IDLE_TIMEOUT.
 */
export class KernelSetup {
  constructor(private readonly preferences: () => IKernelPreferences) {}

  /** Follow the kernels of this tracker's widgets. */
  track(tracker: IWidgetTracker<SessionWidget>): void {
    tracker.forEach(widget => this.watch(widget.sessionContext));
    tracker.widgetAdded.connect((_, widget) => this.watch(widget.sessionContext));
  }

  /** The settings changed (or were loaded): tell the server and every kernel followed. */
  update(): void {
    void this.sendToServer();
    this.states.forEach((state, context) => void this.configure(context, state));
  }

  private watch(context: ISessionContext): void {
    if (this.states.has(context)) {
      return;
    }
    const state: IKernelState = { kernel: context.session?.kernel ?? null, sent: '' };
    this.states.set(context, state);
    context.kernelChanged.connect((_, change) => {
      state.kernel = change.newValue;
      state.sent = '';
      void this.configure(context, state); // queued by the connection until it is open
    });
    context.statusChanged.connect((_, status) => {
      if (status === 'restarting' || status === 'autorestarting' || status === 'starting') {
        state.sent = ''; // a new kernel process starts from its configured defaults
      } else if (status === 'idle') {
        void this.configure(context, state);
      }
    });
    context.disposed.connect(() => this.states.delete(context));
    void this.configure(context, state);
  }

  private async configure(context: ISessionContext, state: IKernelState): Promise<void> {
    const kernel = state.kernel;
    const line = gpuDefaultLine(this.preferences());
    if (!kernel || kernel.isDisposed || line === state.sent) {
      return;
    }
    if (!(await isLocalPython(kernel)) || state.kernel !== kernel || line === state.sent) {
      return;
    }
    state.sent = line;
    try {
      const future = kernel.requestExecute({
        code: line || '%gpu default --reset',
        silent: true,
        store_history: false,
        allow_stdin: false,
        stop_on_error: false // never aborts the cells queued behind it
      });
      const reply = await future.done;
      if (reply.content.status !== 'ok') {
        // This kernel's Python has no gpupool (no %gpu): nothing to set there.
        console.debug(`gpupool: ${context.name}: %gpu default not applied`, reply.content);
      }
    } catch (reason) {
      if (state.kernel === kernel) {
        state.sent = '';
      }
      console.debug('gpupool: %gpu default not sent', reason);
    }
  }

  private async sendToServer(): Promise<void> {
    const idleTimeout = Math.floor(this.preferences().idleTimeout || 0);
    if (idleTimeout === this.serverIdleTimeout) {
      return;
    }
    const settings = ServerConnection.makeSettings();
    const url = URLExt.join(settings.baseUrl, 'gpupool', 'preferences');
    try {
      const response = await ServerConnection.makeRequest(
        url,
        { method: 'PUT', body: JSON.stringify({ idleTimeout }) },
        settings
      );
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error(data.message || `the server answered ${response.status}`);
      }
      this.serverIdleTimeout = idleTimeout;
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      Notification.warning(`GPU pool: the idle timeout setting was not applied: ${message}`, {
        autoClose: 10000
      });
    }
  }

  private readonly states = new Map<ISessionContext, IKernelState>();
  private serverIdleTimeout: number | null = null;
}

/** A Python kernel of this machine: not one of the pool's kernelspecs (those name a GPU shape,
 * or in gateway mode are all the pool's). */
async function isLocalPython(kernel: Kernel.IKernelConnection): Promise<boolean> {
  try {
    const spec = await kernel.spec;
    const metadata = (spec?.metadata ?? {}) as { [key: string]: unknown };
    return (spec?.language ?? '').toLowerCase() === 'python' && !('gpupool' in metadata);
  } catch {
    return false;
  }
}
