import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IMessageHandler, Message, MessageLoop } from '@lumino/messaging';

import { IKernelInfo, requestAPI, shapeLabel } from './api';

/** "about 4 min, at 16:45" for a kernel that idles `seconds` from now. */
export function idleIn(seconds: number, now = Date.now()): string {
  const at = new Date(now + seconds * 1000).toLocaleTimeString([], {
    hour: '2-digit',
    minute: '2-digit'
  });
  const minutes = Math.round(seconds / 60);
  return `${minutes >= 1 ? `about ${minutes} min` : 'under a minute'}, at ${at}`;
}

/**
 * Closing the last notebook tab of a running pool kernel asks whether to keep the kernel
 * (billed until it idles) or shut it down. Lab closes a tab without touching its kernel, so a
 * GPU would otherwise stay held, and billed, by a kernel no tab shows.
 *
 * A message hook on each notebook panel sees its 'close-request' before the document manager's
 * own hook (the most recently installed runs first) and can hold it while it asks; "Shut it
 * down" uses Lab's own `shutdownOnDispose`, so the kernel goes only if the tab really closes
 * (not when the user cancels the save-changes question that may follow).
 */
export class ClosingGuard {
  private asking = new WeakSet<NotebookPanel>();
  private letThrough = new WeakSet<NotebookPanel>();

  constructor(private tracker: INotebookTracker) {
    tracker.widgetAdded.connect((_, panel) => {
      // A microtask later: the document manager installs its hook after the tracker hears of
      // the panel, and ours has to be installed after it to run first.
      void Promise.resolve().then(() => {
        if (!panel.isDisposed) {
          MessageLoop.installMessageHook(panel, this.hook);
        }
      });
    });
  }

  private hook = (handler: IMessageHandler, msg: Message): boolean => {
    if (msg.type !== 'close-request') {
      return true;
    }
    const panel = handler as NotebookPanel;
    if (this.letThrough.delete(panel)) {
      return true;
    }
    if (this.asking.has(panel)) {
      return false; // a second click while we ask
    }
    const id = panel.sessionContext.session?.kernel?.id;
    if (!id || this.tracker.find(p => p !== panel && p.sessionContext.session?.kernel?.id === id)) {
      return true; // no kernel, or another tab keeps using it
    }
    this.asking.add(panel);
    void this.ask(panel, id).finally(() => this.asking.delete(panel));
    return false;
  };

  private async ask(panel: NotebookPanel, kernelId: string): Promise<void> {
    let info: IKernelInfo | null = null;
    try {
      info = await requestAPI<IKernelInfo>(`kernels/${kernelId}`);
    } catch {
      info = null; // a local kernel (404), or the pool unreachable: close as Lab would
    }
    const g = info?.gpupool;
    if (!g?.gpu_type || g.state !== 'running') {
      this.close(panel);
      return;
    }
    const shape = shapeLabel(g.gpu_type, g.gpu_count ?? 1);
    const left = g.idle_seconds_left ?? g.idle_timeout ?? 0;
    const keep = `Keep ${shape} running`;
    const body =
      `No other tab uses this kernel. Kept, it holds its ${shape} and is billed until it ` +
      `idles (${idleIn(left)}, if no cell runs); shut down, its variables are gone.`;
    const result = await showDialog({
      title: `Close the last tab of a ${shape} kernel`,
      body,
      buttons: [
        Dialog.cancelButton(),
        Dialog.okButton({ label: keep }),
        Dialog.warnButton({ label: 'Shut it down' })
      ],
      defaultButton: 1
    });
    if (result.button.label === keep) {
      this.close(panel);
    } else if (result.button.label === 'Shut it down') {
      const context = panel.sessionContext;
      context.kernelPreference = { ...context.kernelPreference, shutdownOnDispose: true };
      this.close(panel);
    }
  }

  private close(panel: NotebookPanel): void {
    if (!panel.isDisposed) {
      this.letThrough.add(panel);
      panel.close();
    }
  }
}
