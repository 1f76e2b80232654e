import { Dialog, showDialog } from '@jupyterlab/apputils';
import { ICodeCellModel } from '@jupyterlab/cells';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import {
  clock,
  GpupoolError,
  IGpuReading,
  IKernelInfo,
  IShape,
  money,
  reportOnce,
  requestAPI,
  shapeLabel
} from './api';
import { RUN_MIME } from './mime';
import { KernelNotifier } from './notify';

const FAST_MS = 2000; // poll period while all is well
const SLOW_MS = 60000; // the longest wait after errors

/** "queued 2", "starting", "running", "idle", "suspended", "resuming", "lost" */
export function stateInWords(info: IKernelInfo): string {
  const g = info.gpupool;
  switch (g.state) {
    case 'queued':
      return `queued ${g.queue_position ?? ''}`.trim();
    case 'running':
      return info.execution_state === 'busy' ? 'running' : 'idle';
    case 'dead':
      return 'lost';
    default:
      return g.state ?? 'unknown';
  }
}

const GIB = 1024 ** 3; // "80 GB" as the launcher shows a GPU's memory

/** "37%" and "12.1/80 GB" for the GPUs a kernel holds (averaged, summed), what is known of it. */
export function gpuLoad(gpus: IGpuReading[]): string[] {
  const busy = gpus.map(g => g.utilization).filter((u): u is number => u !== null);
  const load = busy.length
    ? [`${Math.round(busy.reduce((a, b) => a + b, 0) / busy.length)}%`]
    : [];
  const sum = (key: 'memory_used' | 'memory_total') =>
    gpus.reduce((total, g) => total + (g[key] ?? 0), 0);
  const total = sum('memory_total');
  if (total > 0) {
    load.push(`${(sum('memory_used') / GIB).toFixed(1)}/${Math.round(total / GIB)} GB`);
  }
  return load;
}

/** The gateway id of the `%%gpu` companion the notebook's last footer names, or ''. */
export function companionOf(panel: NotebookPanel | null): string {
  const cells = panel?.model?.cells;
  for (let i = (cells?.length ?? 0) - 1; i >= 0; i--) {
    const cell = cells!.get(i);
    if (cell.type !== 'code') {
      continue;
    }
    const outputs = (cell as ICodeCellModel).outputs;
    for (let j = outputs.length - 1; j >= 0; j--) {
      const run = outputs.get(j).data[RUN_MIME] as { kernel_id?: unknown } | undefined;
      if (run && typeof run.kernel_id === 'string' && run.kernel_id) {
        return run.kernel_id;
      }
    }
  }
  return '';
}

/**
 * The current notebook's pool kernel in the status bar: its state in words, GPUs, cost so far
 * (ticking each second while GPUs are held) and time left until idle suspend. Polls with
 * backoff, pauses while the tab is hidden, hides itself for local kernels.
 */
export class KernelStatus extends Widget {
  private info: IKernelInfo | null = null;
  private seenAt = 0; // when `info` was fetched (ms)
  private kernelId = '';
  private companion = ''; // for a local kernel: the gateway id of its %%gpu companion
  private delay = FAST_MS;
  private pollTimer = 0;
  private tickTimer = 0;
  private notifier = new KernelNotifier(info => {
    const g = info.gpupool;
    const shape = this.shapes().find(
      s => s.gpu_type === g.gpu_type && s.gpu_count === g.gpu_count
    );
    return this.showCost() ? (shape?.usd_per_hour ?? null) : null;
  });

  constructor(
    private tracker: INotebookTracker,
    private shapes: () => IShape[],
    private showCost: () => boolean
  ) {
    super();
    this.addClass('gpupool-status');
    this.node.title = 'GPU pool kernel: click for details';
    this.node.addEventListener('click', () => void this.details());
    tracker.currentChanged.connect(this.follow, this);
    document.addEventListener('visibilitychange', () => {
      if (document.hidden) {
        window.clearTimeout(this.pollTimer);
        window.clearInterval(this.tickTimer);
      } else {
        this.tickTimer = window.setInterval(() => this.render(), 1000);
        this.poll(0);
      }
    });
    this.tickTimer = window.setInterval(() => this.render(), 1000);
    this.follow();
  }

  /** Watch the current notebook's kernel, and that notebook's kernel changes. */
  private follow(): void {
    const panel = this.tracker.currentWidget;
    if (panel) {
      panel.sessionContext.kernelChanged.connect(this.follow, this);
      panel.sessionContext.statusChanged.connect(() => this.poll(300), this);
    }
    const id = panel?.sessionContext.session?.kernel?.id ?? '';
    if (id !== this.kernelId) {
      this.kernelId = id;
      this.info = null;
      this.render();
    }
    this.delay = FAST_MS;
    this.poll(0);
  }

  private poll(after: number): void {
    window.clearTimeout(this.pollTimer);
    if (!this.kernelId || document.hidden) {
      return;
    }
    this.pollTimer = window.setTimeout(() => void this.fetch(), after);
  }

  private async fetch(): Promise<void> {
    const id = this.kernelId;
    try {
      let info: IKernelInfo;
      let companion = '';
      try {
        info = await requestAPI<IKernelInfo>(`kernels/${id}`);
      } catch (error) {
        // A local kernel: its %%gpu companion, if a cell's footer names one.
        companion = error instanceof GpupoolError && error.status === 404
          ? companionOf(this.tracker.currentWidget) : '';  // prettier-ignore
        if (!companion) {
          throw error;
        }
        info = await requestAPI<IKernelInfo>(`companions/${companion}`);
      }
      if (id !== this.kernelId) {
        return;
      }
      this.info = info;
      this.companion = companion;
      this.seenAt = Date.now();
      if (!companion) {
        this.notifier.update(info); // a companion's cell footer says its state already
      }
      this.delay = FAST_MS;
    } catch (error) {
      if (id !== this.kernelId) {
        return;
      }
      this.info = null;
      if (error instanceof GpupoolError && error.status === 404) {
        this.delay = SLOW_MS / 2; // a local kernel (or one gone): look again now and then
      } else {
        reportOnce(error);
        this.delay = Math.min(SLOW_MS, this.delay * 2);
      }
    }
    this.render();
    this.poll(this.delay);
  }

  /** The cost so far, counted on from the last answer while GPUs are held. */
  cost(now = Date.now()): number | null {
    const g = this.info?.gpupool;
    if (!g || g.cost_usd === undefined) {
      return null;
    }
    const holding = ['starting', 'running', 'resuming'].includes(g.state ?? '');
    const shape = this.shapes().find(
      s => s.gpu_type === g.gpu_type && s.gpu_count === g.gpu_count
    );
    const rate = holding && shape?.usd_per_hour ? shape.usd_per_hour / 3600 : 0;
    return g.cost_usd + (rate * (now - this.seenAt)) / 1000;
  }

  render(): void {
    const info = this.info;
    if (!info || !info.gpupool.gpu_type) {
      this.node.textContent = '';
      this.hide();
      return;
    }
    const g = info.gpupool;
    const words = stateInWords(info);
    const label = this.companion ? '%%gpu' : 'GPU';
    const parts = [`${label} ${shapeLabel(g.gpu_type!, g.gpu_count ?? 1)}`, words];
    parts.push(...gpuLoad(g.gpus ?? []));
    if (this.showCost()) {
      parts.push(money(this.cost(), 4));
    }
    if (g.idle_seconds_left !== null && g.idle_seconds_left !== undefined) {
      const left = g.idle_seconds_left - (Date.now() - this.seenAt) / 1000;
      parts.push(`suspends in ${clock(left)}`);
    }
    this.node.textContent = parts.join(' \u00b7 ');
    this.node.className = `gpupool-status gpupool-mod-${words.split(' ')[0]}`;
    this.show();
  }

  private async details(): Promise<void> {
    const info = this.info;
    if (!info) {
      return;
    }
    const g = info.gpupool;
    const companion = this.companion;
    const rows: [string, string][] = [
      [companion ? '%%gpu kernel' : 'Kernel', info.id],
      ['State', stateInWords(info) + (g.reason ? ` (${g.reason})` : '')],
      ['GPUs', shapeLabel(g.gpu_type ?? '?', g.gpu_count ?? 1)]
    ];
    if (g.host) {
      rows.push(['Host', g.host]);
    }
    if (g.started) {
      rows.push(['Started', new Date(g.started).toLocaleString()]);
    }
    (g.gpus ?? []).forEach((gpu, i) =>
      rows.push([`GPU ${i}`, [gpu.uuid, ...gpuLoad([gpu])].join(' \u00b7 ')])
    );
    rows.push(
      ['Billed', `${Math.round(g.billed_seconds ?? 0)} s`],
      ['Cost so far', money(this.cost(), 4)],
      ['Idle timeout', `${g.idle_timeout ?? '?'} s`]
    );
    const body = new Widget();
    const table = document.createElement('table');
    for (const [key, value] of rows) {
      const row = table.insertRow();
      row.insertCell().textContent = key;
      row.insertCell().textContent = value;
    }
    body.node.appendChild(table);
    const result = await showDialog({
      title: companion ? 'The GPU kernel of this notebook\'s %%gpu cells' : 'GPU pool kernel',
      body,
      buttons: [
        Dialog.cancelButton({ label: 'Close' }),
        Dialog.warnButton({ label: 'Release GPU (shut down)' })
      ]
    });
    if (!result.button.accept) {
      return;
    }
    const session = this.tracker.currentWidget?.sessionContext;
    if (companion) {
      // The local kernel's own `%gpu release`, so that its %%gpu knows the GPU is gone.
      const code = 'get_ipython().run_line_magic("gpu", "release")';
      await session?.session?.kernel?.requestExecute({ code, silent: true, store_history: false })
        .done;
      this.poll(0);
    } else {
      await session?.shutdown();
    }
  }
}
