import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { IShape, money, requestAPI, shapeLabel } from './api';
import { cardLabel } from './launcher';

export const PICK_COMMAND = 'gpupool:pick-shape';

/** What picking a shape will do, in words. */
export function outlook(shape: IShape): string {
  if ((shape.free ?? 0) >= shape.gpu_count) {
    return 'starts now';
  }
  return `queued, position ${(shape.queue ?? 0) + 1}`;
}

const REFRESH_MS = 3000; // while the picker is open

/** A table of the pool's shapes, one radio button per row, refreshed while open. */
class ShapeTable extends Widget {
  private body: HTMLTableSectionElement;

  constructor(
    private shapes: IShape[],
    private showCost: boolean
  ) {
    super();
    this.addClass('gpupool-picker');
    const table = document.createElement('table');
    const head = table.createTHead().insertRow();
    const columns = ['', 'GPU', 'memory', ...(showCost ? ['price'] : []), 'free', 'queue', ''];
    for (const name of columns) {
      const th = document.createElement('th');
      th.textContent = name;
      head.appendChild(th);
    }
    this.body = table.createTBody();
    this.node.appendChild(table);
    this.fill(shapes);
  }

  /** Redraw the rows from `shapes`, keeping the row the user checked (by shape name). */
  fill(shapes: IShape[]): void {
    const chosen = this.getValue()?.name;
    this.shapes = shapes;
    this.body.textContent = '';
    shapes.forEach((shape, index) => {
      const row = this.body.insertRow();
      row.title = cardLabel(shape, this.showCost);
      const radio = document.createElement('input');
      radio.type = 'radio';
      radio.name = 'gpupool-shape';
      radio.value = String(index);
      radio.disabled = !shape.kernel_name;
      radio.checked = !radio.disabled && (chosen ? shape.name === chosen : index === 0);
      row.insertCell().appendChild(radio);
      const cells = [
        shapeLabel(shape.gpu_type, shape.gpu_count),
        shape.memory_gb ? `${shape.memory_gb} GB` : '?',
        ...(this.showCost ? [`${money(shape.usd_per_hour)}/h`] : []),
        String(shape.free ?? '?'),
        String(shape.queue ?? '?'),
        shape.kernel_name ? outlook(shape) : 'no kernelspec here'
      ];
      for (const text of cells) {
        row.insertCell().textContent = text;
      }
      row.addEventListener('click', () => {
        if (!radio.disabled) {
          radio.checked = true;
        }
      });
    });
  }

  getValue(): IShape | null {
    const checked = this.node.querySelector<HTMLInputElement>('input:checked');
    return checked ? (this.shapes[Number(checked.value)] ?? null) : null;
  }
}

/** Ask for a shape and change the current notebook's kernel to it. */
export async function pickShape(
  tracker: INotebookTracker,
  shapes: IShape[],
  showCost: boolean
): Promise<void> {
  const panel = tracker.currentWidget;
  if (!panel || shapes.length === 0) {
    return;
  }
  const table = new ShapeTable(shapes, showCost);
  const refresh = async (): Promise<void> => {
    try {
      table.fill((await requestAPI<{ shapes: IShape[] }>('shapes')).shapes);
    } catch {
      // the launcher's own refresh reports gateway trouble once; the table keeps its rows
    }
  };
  void refresh();
  const timer = window.setInterval(() => void refresh(), REFRESH_MS);
  let result;
  try {
    result = await showDialog({
      title: 'Run this notebook on a GPU',
      body: table,
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Change kernel' })]
    });
  } finally {
    window.clearInterval(timer);
  }
  const shape = result.button.accept ? table.getValue() : null;
  if (shape?.kernel_name) {
    await panel.sessionContext.changeKernel({ name: shape.kernel_name });
  }
}
