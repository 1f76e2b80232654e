import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
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

/**
 * The current notebook's pool kernel in the status bar: its state in words, GPUs, cost so far
 * (ticking each second while GPUs are held) and time left until idle suspend. Polls with
 * backoff, pauses while the tab is hidden, hides itself for local kernels.
 */
export class KernelStatus extends Widget {
  private info: IKernelInfo | null = null;
  private seenAt = 0; // when `info` was fetched (ms)
  private kernelId = '';
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
      const info = await requestAPI<IKernelInfo>(`kernels/${id}`);
      if (id !== this.kernelId) {
        return;
      }
      this.info = info;
      this.seenAt = Date.now();
      this.notifier.update(info);
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
    const parts = [`GPU ${shapeLabel(g.gpu_type!, g.gpu_count ?? 1)}`, words];
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
    const rows: [string, string][] = [
      ['Kernel', info.id],
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
      title: 'GPU pool kernel',
      body,
      buttons: [
        Dialog.cancelButton({ label: 'Close' }),
        Dialog.warnButton({ label: 'Release GPU (shut down)' })
      ]
    });
    if (result.button.accept) {
      await this.tracker.currentWidget?.sessionContext.shutdown();
    }
  }
}
