import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

/** What `%%gpu` shows while its GPU kernel is queued or starting, and after each run. */
export const RUN_MIME = 'application/vnd.gpupool.run+json';

export interface IRun {
  state: string; // queued, starting, suspended, resuming, ready; done after the run
  kernel_id: string | null;
  gpu_type: string;
  gpu_count: number;
  queue_position?: number | null;
  elapsed_seconds?: number;
  wall_seconds?: number;
  gpu_seconds?: number | null; // billed by the gateway for this run; null: it could not say
  cost_usd?: number | null;
  sent?: { [name: string]: number };
  received?: { [name: string]: number };
}

/** 8000 -> "8.0 KB", as the magic's own lines say sizes. */
export function bytes(size: number): string {
  const units = ['bytes', 'KB', 'MB', 'GB'];
  let unit = 0;
  while (size >= 1000 && unit < units.length - 1) {
    size /= 1000;
    unit++;
  }
  return unit ? `${size.toFixed(1)} ${units[unit]}` : `${Math.round(size)} bytes`;
}

function seconds(s: number | undefined): string {
  return `${(s ?? 0).toFixed(s !== undefined && s < 10 ? 1 : 0)} s`;
}

/** The footer's line: "H100 ×1 · queued, position 2 · 3 s", or after the run
 * "H100 ×1 · 2.1 s · 1.9 GPU-s billed · $0.0016 · sent arr (8.0 KB) · received y (8.0 KB)". */
export function footerText(run: IRun): string {
  const parts = [`${run.gpu_type} \u00d7${run.gpu_count}`];
  switch (run.state) {
    case 'queued':
      parts.push(`queued, position ${run.queue_position ?? '?'}`, seconds(run.elapsed_seconds));
      break;
    case 'ready':
      parts.push(`ready in ${seconds(run.elapsed_seconds)}`);
      break;
    case 'done': {
      parts.push(seconds(run.wall_seconds));
      if (run.gpu_seconds === null || run.gpu_seconds === undefined) {
        parts.push('GPU time not known');
      } else {
        const cost = `$${(run.cost_usd ?? 0).toFixed(4)}`;
        parts.push(`${run.gpu_seconds.toFixed(1)} GPU-s billed`, cost);
      }
      for (const [key, verb] of [['sent', 'sent'], ['received', 'received']] as const) {
        const named = Object.entries(run[key] ?? {}).map(([n, b]) => `${n} (${bytes(b)})`);
        if (named.length) {
          parts.push(`${verb} ${named.join(', ')}`);
        }
      }
      break;
    }
    default:
      parts.push(run.state, seconds(run.elapsed_seconds));
  }
  return parts.join(' \u00b7 ');
}

/** A `%%gpu` cell's footer line. */
class RunFooter extends Widget implements IRenderMime.IRenderer {
  constructor() {
    super();
    this.addClass('gpupool-run-footer');
  }

  renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const run = model.data[RUN_MIME] as unknown as IRun;
    this.node.textContent = footerText(run);
    this.node.dataset.state = run.state;
    if (run.kernel_id) {
      this.node.dataset.kernelId = run.kernel_id;
      this.node.title = `GPU kernel ${run.kernel_id}`;
    }
    return Promise.resolve();
  }
}

const extension: IRenderMime.IExtension = {
  id: '@gpupool/labextension:run-footer',
  description: 'The footer of a %%gpu cell: where it ran, its time, cost and variables.',
  rendererFactory: {
    safe: true,
    mimeTypes: [RUN_MIME],
    createRenderer: () => new RunFooter()
  },
  rank: 0,
  dataType: 'json'
};

export default extension;
