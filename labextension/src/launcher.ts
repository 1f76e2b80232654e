import { JupyterFrontEnd } from '@jupyterlab/application';
import { ILauncher } from '@jupyterlab/launcher';
import { notebookIcon } from '@jupyterlab/ui-components';
import { IDisposable } from '@lumino/disposable';

import { IShape, money, reportOnce, requestAPI, shapeLabel } from './api';

export const CATEGORY = 'GPU pool';
export const OPEN_COMMAND = 'gpupool:new-notebook';
const PROVISIONER = 'gpupool-provisioner';
const DUPLICATES_STYLE = 'gpupool-launcher-duplicates';

/** A CSS string's body: the text between its double quotes. */
function cssString(text: string): string {
  return text.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\a ');
}

export interface ILauncherOptions {
  showCost: () => boolean;
  defaultShape: () => string;
  refreshSeconds: () => number;
}

/** "H100 ×1 · 80 GB · $3.95/h · 2 free", or "… · none free: queued, position 3". */
export function cardLabel(shape: IShape, showCost: boolean): string {
  const parts = [shapeLabel(shape.gpu_type, shape.gpu_count)];
  if (shape.memory_gb) {
    parts.push(`${shape.memory_gb} GB`);
  }
  if (showCost && shape.usd_per_hour !== null) {
    parts.push(`${money(shape.usd_per_hour)}/h`);
  }
  if ((shape.free ?? 0) >= shape.gpu_count) {
    parts.push(`${shape.free} free`);
    if (shape.queue) {
      parts.push(`queue ${shape.queue}`);
    }
  } else {
    parts.push(`none free: queued, position ${(shape.queue ?? 0) + 1}`);
  }
  return parts.join(' \u00b7 ');
}

/** The pool's shapes as a launcher section, refreshed while the tab is visible. */
export class PoolLauncher {
  shapes: IShape[] = [];
  private items: IDisposable[] = [];
  private kernelNames: (string | null)[] = [];
  private key = '';
  private timer = 0;

  constructor(
    private app: JupyterFrontEnd,
    private launcher: ILauncher,
    private options: ILauncherOptions
  ) {
    app.commands.addCommand(OPEN_COMMAND, {
      label: args => String(args.label ?? 'GPU notebook'),
      caption: args => String(args.caption ?? ''),
      icon: notebookIcon,
      isEnabled: args => !!args.kernelName,
      execute: args =>
        app.commands.execute('notebook:create-new', {
          kernelName: args.kernelName as string,
          cwd: (args.cwd as string) ?? ''
        })
    });
    // Lab may list its kernelspecs after the pool's shapes came: hide their cards then.
    app.serviceManager.kernelspecs.specsChanged.connect(() => this.hideDuplicates());
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden) {
        void this.refresh();
      }
    });
  }

  /** Fetch the shapes now and again every refreshSeconds (skipped while hidden). */
  start(): void {
    void this.refresh();
  }

  redraw(): void {
    this.key = '';
    this.show();
  }

  async refresh(): Promise<void> {
    window.clearTimeout(this.timer);
    if (!document.hidden) {
      try {
        this.shapes = (await requestAPI<{ shapes: IShape[] }>('shapes')).shapes;
        this.show();
      } catch (error) {
        reportOnce(error);
      }
    }
    this.timer = window.setTimeout(
      () => void this.refresh(),
      this.options.refreshSeconds() * 1000
    );
  }

  private show(): void {
    const showCost = this.options.showCost();
    const preferred = this.options.defaultShape().toLowerCase();
    const cards = this.shapes.map(shape => {
      const label = cardLabel(shape, showCost);
      const named = `${shape.gpu_type}:${shape.gpu_count}`.toLowerCase();
      const isDefault =
        preferred !== '' &&
        (named === preferred ||
          (shape.gpu_count === 1 && shape.gpu_type.toLowerCase() === preferred));
      return { shape, label, isDefault };
    });
    const key = JSON.stringify(cards.map(c => [c.label, c.shape.kernel_name, c.isDefault]));
    if (key === this.key) {
      return;
    }
    this.key = key;
    this.kernelNames = cards.map(c => c.shape.kernel_name);
    this.hideDuplicates();
    this.items.forEach(item => item.dispose());
    this.items = cards.map(({ shape, label, isDefault }, index) =>
      this.launcher.add({
        command: OPEN_COMMAND,
        category: CATEGORY,
        rank: isDefault ? -1 : index,
        args: {
          kernelName: shape.kernel_name,
          label: isDefault ? `${label} (default)` : label,
          caption: shape.kernel_name
            ? `New notebook on ${label}`
            : `${label}: this Jupyter server has no kernelspec for it yet`
        }
      })
    );
  }

  /**
   * The Notebook section's cards of the pool's own kernelspecs (the provisioner's, in hybrid
   * mode), hidden: this section shows each shape once, with its price and what is free. Their
   * Console cards stay (this section opens notebooks only), and so do the gateway's kernelspecs
   * in gateway mode, which Lab lists as its own.
   */
  private hideDuplicates(): void {
    const specs = this.app.serviceManager.kernelspecs.specs?.kernelspecs ?? {};
    const rules = this.kernelNames
      .map(name => (name ? specs[name] : undefined))
      .filter(spec => {
        const provisioner = (spec?.metadata?.kernel_provisioner ?? {}) as {
          provisioner_name?: string;
        };
        return provisioner.provisioner_name === PROVISIONER;
      })
      .map(
        spec =>
          `.jp-LauncherCard[data-category="Notebook"][title="${cssString(spec!.display_name)}"]`
      );
    let style = document.getElementById(DUPLICATES_STYLE);
    if (!style) {
      style = document.createElement('style');
      style.id = DUPLICATES_STYLE;
      document.head.appendChild(style);
    }
    style.textContent = rules.length ? `${rules.join(',\n')} { display: none; }` : '';
  }
}
