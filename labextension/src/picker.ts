import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { IShape, money, shapeLabel } from './api';
import { cardLabel } from './launcher';

export const PICK_COMMAND = 'gpupool:pick-shape';

/** What picking a shape will do, in words. */
export function outlook(shape: IShape): string {
  if ((shape.free ?? 0) >= shape.gpu_count) {
    return 'starts now';
  }
  return `queued, position ${(shape.queue ?? 0) + 1}`;
}

/** A table of the pool's shapes, one radio button per row. */
class ShapeTable extends Widget {
  constructor(
    private shapes: IShape[],
    showCost: boolean
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
    const body = table.createTBody();
    shapes.forEach((shape, index) => {
      const row = body.insertRow();
      row.title = cardLabel(shape, showCost);
      const radio = document.createElement('input');
      radio.type = 'radio';
      radio.name = 'gpupool-shape';
      radio.value = String(index);
      radio.disabled = !shape.kernel_name;
      radio.checked = index === 0 && !radio.disabled;
      row.insertCell().appendChild(radio);
      const cells = [
        shapeLabel(shape.gpu_type, shape.gpu_count),
        shape.memory_gb ? `${shape.memory_gb} GB` : '?',
        ...(showCost ? [`${money(shape.usd_per_hour)}/h`] : []),
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
    this.node.appendChild(table);
  }

  getValue(): IShape | null {
    const checked = this.node.querySelector<HTMLInputElement>('input:checked');
    return checked ? this.shapes[Number(checked.value)] : null;
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
  const result = await showDialog({
    title: 'Run this notebook on a GPU',
    body: table,
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Change kernel' })]
  });
  const shape = result.button.accept ? table.getValue() : null;
  if (shape?.kernel_name) {
    await panel.sessionContext.changeKernel({ name: shape.kernel_name });
  }
}
