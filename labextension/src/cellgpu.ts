import { JupyterFrontEnd } from '@jupyterlab/application';
import { Cell } from '@jupyterlab/cells';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';
import { Menu } from '@lumino/widgets';

import { IShape, money, reportOnce, requestAPI, shapeLabel } from './api';

export const RUN_COMMAND = 'gpupool:run-cell-on-gpu';
export const TOGGLE_COMMAND = 'gpupool:toggle-cell-gpu';
export const SHAPES_COMMAND = 'gpupool:cell-gpu-shapes';
export const RUN_ON_COMMAND = 'gpupool:run-cell-on-shape';

/** A GPU chip, for the cell toolbar's "Run Cell on GPU". */
export const gpuIcon = new LabIcon({
  name: 'gpupool:gpu',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16" height="16">' +
    '<g class="jp-icon3" fill="#616161"><path d="M7 7h10v10H7z" fill-opacity=".35"/>' +
    '<path d="M9 2h2v3H9zm4 0h2v3h-2zM9 19h2v3H9zm4 0h2v3h-2zM2 9h3v2H2zm0 4h3v2H2zm17-4h3v2h-3zm0 ' +
    '4h3v2h-3zM5 5h14v14H5zm2 2v10h10V7z"/><path d="M10 9.5l5 2.5-5 2.5z"/></g></svg>'
});

/** A caret, for the shape menu beside it. */
export const caretIcon = new LabIcon({
  name: 'gpupool:gpu-shapes',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="12" height="16">' +
    '<g class="jp-icon3" fill="#616161"><path d="M6 9l6 7 6-7z"/></g></svg>'
});

/** What a cell's `%%gpu` first line asks for: type and count where it names them. */
export interface IMark {
  gpuType: string | null;
  count: number | null;
  rest: string[]; // the line's other options, kept when the shape changes
}

/** The `%%gpu` line of a cell's source, or null for a cell that runs locally. */
export function parseMark(source: string): IMark | null {
  const first = source.split('\n', 1)[0];
  if (!/^%%gpu(\s|$)/.test(first)) {
    return null;
  }
  const words = first.trim().split(/\s+/).slice(1);
  const mark: IMark = { gpuType: null, count: null, rest: [] };
  for (let i = 0; i < words.length; i++) {
    const [flag, inline] = words[i].split('=', 2);
    const value = () => (inline !== undefined ? inline : words[++i]);
    if (flag === '-t' || flag === '--type') {
      mark.gpuType = value() ?? null;
    } else if (flag === '-n' || flag === '--count') {
      const n = parseInt(value() ?? '', 10);
      mark.count = Number.isFinite(n) ? n : null;
    } else {
      mark.rest.push(words[i]);
    }
  }
  return mark;
}

/** The source with its first line `%%gpu -t TYPE [-n COUNT]` (replacing any `%%gpu` line). */
export function markSource(source: string, gpuType: string, count: number): string {
  const mark = parseMark(source);
  const body = mark ? source.slice(source.split('\n', 1)[0].length + 1) : source;
  const words = ['%%gpu', '-t', gpuType, ...(count > 1 ? ['-n', String(count)] : [])];
  return [...words, ...(mark?.rest ?? [])].join(' ') + '\n' + body;
}

/** The source without its `%%gpu` line. */
export function unmarkSource(source: string): string {
  if (!parseMark(source)) {
    return source;
  }
  const end = source.indexOf('\n');
  return end < 0 ? '' : source.slice(end + 1);
}

/** "H100:2" or "H100" (the defaultShape setting) as type and count; null when empty or bad. */
export function parseShapeSetting(text: string): { gpuType: string; count: number } | null {
  const match = /^\s*([A-Za-z0-9_.-]+)\s*(?::\s*(\d+))?\s*$/.exec(text);
  if (!match) {
    return null;
  }
  return { gpuType: match[1], count: match[2] ? parseInt(match[2], 10) : 1 };
}

/** A shape's menu line: "H100 ×1 · $3.00/h · 2 free". */
export function menuLabel(shape: IShape, showCost: boolean): string {
  const parts = [shapeLabel(shape.gpu_type, shape.gpu_count)];
  if (showCost && shape.usd_per_hour !== null) {
    parts.push(`${money(shape.usd_per_hour)}/h`);
  }
  if (shape.free !== null) {
    parts.push(shape.free >= shape.gpu_count ? `${shape.free} free` : 'none free: queued');
  }
  return parts.join(' \u00b7 ');
}

interface IOptions {
  defaultShape: () => string;
  showCost: () => boolean;
}

/**
 * "Run Cell on GPU": the active code cell gets a `%%gpu -t TYPE [-n COUNT]` first line (the
 * notebook file stays the truth, so Run All and `jupyter execute` do the same) and runs in its
 * own kernel, whose `%%gpu` sends it to a pooled GPU. Marked cells carry a badge.
 */
export class CellGpu {
  private shapes: IShape[] = [];

  constructor(
    private app: JupyterFrontEnd,
    tracker: INotebookTracker,
    private options: IOptions
  ) {
    const { commands } = app;
    const current = () => {
      const panel = tracker.currentWidget;
      const cell = panel?.content.activeCell;
      return panel && cell && cell.model.type === 'code' ? { panel, cell } : null;
    };
    commands.addCommand(RUN_COMMAND, {
      label: 'Run Cell on GPU',
      caption: 'Run this cell on a pooled GPU (adds a %%gpu first line)',
      icon: gpuIcon,
      isEnabled: () => current() !== null,
      execute: async () => {
        const target = current();
        if (!target) {
          return;
        }
        if (!parseMark(target.cell.model.sharedModel.getSource())) {
          const shape = await this.defaultShape();
          if (!shape) {
            return;
          }
          this.mark(target.cell, shape.gpuType, shape.count);
        }
        await this.run(target.panel);
      }
    });
    commands.addCommand(RUN_ON_COMMAND, {
      label: args => String(args.label ?? 'Run Cell on this GPU'),
      execute: async args => {
        const target = current();
        if (!target) {
          return;
        }
        this.mark(target.cell, String(args.gpu_type), Number(args.gpu_count) || 1);
        await this.run(target.panel);
      }
    });
    commands.addCommand(TOGGLE_COMMAND, {
      label: () => {
        const target = current();
        const marked = target && parseMark(target.cell.model.sharedModel.getSource());
        return marked ? 'Run Cell Locally (remove %%gpu)' : 'Mark Cell for GPU (add %%gpu)';
      },
      isEnabled: () => current() !== null,
      execute: async () => {
        const target = current();
        if (!target) {
          return;
        }
        const source = target.cell.model.sharedModel.getSource();
        if (parseMark(source)) {
          target.cell.model.sharedModel.setSource(unmarkSource(source));
        } else {
          const shape = await this.defaultShape();
          if (shape) {
            this.mark(target.cell, shape.gpuType, shape.count);
          }
        }
      }
    });
    commands.addCommand(SHAPES_COMMAND, {
      label: 'Pick the GPU for This Cell\u2026',
      caption: 'Run this cell on another GPU shape',
      icon: caretIcon,
      isEnabled: () => current() !== null,
      execute: async () => {
        const target = current();
        if (target) {
          await this.openMenu(target.cell);
        }
      }
    });
    commands.addKeyBinding({
      command: RUN_COMMAND,
      keys: ['Accel Shift G'],
      selector: '.jp-Notebook'
    });
    for (const command of [RUN_COMMAND, TOGGLE_COMMAND, SHAPES_COMMAND]) {
      app.contextMenu.addItem({ command, selector: '.jp-Notebook .jp-CodeCell', rank: 0 });
    }
    tracker.widgetAdded.connect((_, panel) => this.watch(panel));
    tracker.forEach(panel => this.watch(panel));
  }

  private mark(cell: Cell, gpuType: string, count: number): void {
    const model = cell.model.sharedModel;
    model.setSource(markSource(model.getSource(), gpuType, count));
  }

  private async run(panel: NotebookPanel): Promise<void> {
    await NotebookActions.run(panel.content, panel.sessionContext);
  }

  /** The pool's shapes now (kept for when the gateway does not answer). */
  private async refresh(): Promise<IShape[]> {
    try {
      const answer = await requestAPI<{ shapes: IShape[] }>('shapes');
      this.shapes = answer.shapes;
    } catch (error) {
      reportOnce(error);
    }
    return this.shapes;
  }

  /** The defaultShape setting, else the pool's first one-GPU shape with a GPU free, else its
   * first; null (said) when the pool offers none. */
  private async defaultShape(): Promise<{ gpuType: string; count: number } | null> {
    const setting = parseShapeSetting(this.options.defaultShape());
    if (setting) {
      return setting;
    }
    const shapes = this.shapes.length ? this.shapes : await this.refresh();
    const single = shapes.filter(s => s.gpu_count === 1);
    const pick = single.find(s => (s.free ?? 0) > 0) ?? single[0] ?? shapes[0];
    if (!pick) {
      reportOnce(new Error('the pool offers no GPU shape to run this cell on.'));
      return null;
    }
    return { gpuType: pick.gpu_type, count: pick.gpu_count };
  }

  /** The shape menu, under the cell toolbar's caret (or at the cell's top right). */
  private async openMenu(cell: Cell): Promise<void> {
    const shapes = await this.refresh();
    const menu = new Menu({ commands: this.app.commands });
    menu.addClass('gpupool-shape-menu');
    menu.title.label = 'Run this cell on';
    for (const shape of shapes) {
      menu.addItem({
        command: RUN_ON_COMMAND,
        args: {
          gpu_type: shape.gpu_type,
          gpu_count: shape.gpu_count,
          label: menuLabel(shape, this.options.showCost())
        }
      });
    }
    if (parseMark(cell.model.sharedModel.getSource())) {
      menu.addItem({ type: 'separator' });
      menu.addItem({ command: TOGGLE_COMMAND });
    }
    const anchor = cell.node.querySelector(`[data-command="${SHAPES_COMMAND}"]`) ?? cell.node;
    const box = anchor.getBoundingClientRect();
    menu.open(anchor === cell.node ? box.right - 200 : box.left, box.bottom);
  }

  /** Keep the badges of a notebook's cells as their first lines say. */
  private watch(panel: NotebookPanel): void {
    const notebook = panel.content;
    const update = () => {
      for (const cell of notebook.widgets) {
        this.badge(cell);
      }
    };
    notebook.modelContentChanged.connect(update);
    panel.context.ready.then(update).catch(() => undefined);
  }

  private badge(cell: Cell): void {
    const mark = cell.model.type === 'code' ? parseMark(cell.model.sharedModel.getSource()) : null;
    cell.toggleClass('gpupool-gpu-cell', mark !== null);
    // On the cell (to find it) and on its prompt, under whose number CSS shows it.
    const nodes = [cell.node, cell.inputArea?.promptNode].filter((n): n is HTMLElement => !!n);
    if (!mark) {
      nodes.forEach(node => delete node.dataset.gpupoolShape);
      return;
    }
    const fallback = parseShapeSetting(this.options.defaultShape());
    const gpuType = mark.gpuType ?? fallback?.gpuType;
    const label = gpuType ? shapeLabel(gpuType, mark.count ?? fallback?.count ?? 1) : 'GPU';
    for (const node of nodes) {
      if (node.dataset.gpupoolShape !== label) {
        node.dataset.gpupoolShape = label;
      }
    }
  }
}
