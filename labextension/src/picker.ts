import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import {
  Dialog,
  ISessionContext,
  ISessionContextDialogs,
  SessionContextDialogs,
  showDialog
} from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { KernelSpec } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { Widget } from '@lumino/widgets';

import { IShape, money, requestAPI, shapeLabel } from './api';
import { cardLabel } from './launcher';

export const PICK_COMMAND = 'gpupool:pick-shape';
const SETTINGS_ID = '@gpupool/labextension:plugin';
const REFRESH_MS = 3000; // while a picker is open

/** What picking a shape will do, in words. */
export function outlook(shape: IShape): string {
  if ((shape.free ?? 0) >= shape.gpu_count) {
    return 'starts now';
  }
  return `queued, position ${(shape.queue ?? 0) + 1}`;
}

/** One row of a picker: a pool shape, a kernel of this machine, or no kernel at all. */
interface IChoice {
  kernelName: string | null; // null: no kernel
  label: string;
  shape: IShape | null; // pool shapes only
}

/** A table of kernels, one radio button per row, redrawn from fresh rows while open. */
class KernelTable extends Widget {
  private choices: IChoice[] = [];
  private body: HTMLTableSectionElement;
  private note: HTMLParagraphElement;

  constructor(
    private showCost: boolean,
    private chosen: string | null
  ) {
    super();
    this.addClass('gpupool-picker');
    const table = document.createElement('table');
    const head = table.createTHead().insertRow();
    const columns = ['', 'kernel', 'GPU', 'memory', ...(showCost ? ['price'] : [])];
    for (const name of [...columns, 'free', 'queue', '']) {
      const th = document.createElement('th');
      th.textContent = name;
      head.appendChild(th);
    }
    this.body = table.createTBody();
    this.note = document.createElement('p');
    this.note.className = 'gpupool-picker-note';
    this.node.append(table, this.note);
  }

  /** Redraw the rows, keeping the one the user checked (by kernel name). */
  fill(choices: IChoice[], note = ''): void {
    const checked = this.getValue();
    const keep = checked === undefined ? this.chosen : (checked?.name ?? null);
    this.choices = choices;
    this.note.textContent = note;
    this.body.textContent = '';
    choices.forEach((choice, index) => {
      const row = this.body.insertRow();
      const radio = document.createElement('input');
      radio.type = 'radio';
      radio.name = 'gpupool-kernel';
      radio.value = String(index);
      radio.checked = choice.kernelName === keep;
      row.insertCell().appendChild(radio);
      const shape = choice.shape;
      row.title = shape ? cardLabel(shape, this.showCost) : choice.label;
      const cells = shape
        ? [
            choice.label,
            shapeLabel(shape.gpu_type, shape.gpu_count),
            shape.memory_gb ? `${shape.memory_gb} GB` : '?',
            ...(this.showCost ? [`${money(shape.usd_per_hour)}/h`] : []),
            String(shape.free ?? '?'),
            String(shape.queue ?? '?'),
            outlook(shape)
          ]
        : [
            choice.label,
            '',
            '',
            ...(this.showCost ? [''] : []),
            '',
            '',
            choice.kernelName ? 'on this machine' : ''
          ];
      for (const text of cells) {
        row.insertCell().textContent = text;
      }
      row.addEventListener('click', () => (radio.checked = true));
    });
  }

  /** The checked kernel (`null` for "No Kernel"), or undefined when nothing is checked. */
  getValue(): { name: string } | null | undefined {
    const checked = this.node.querySelector<HTMLInputElement>('input:checked');
    const choice = checked ? this.choices[Number(checked.value)] : undefined;
    if (!choice) {
      return undefined;
    }
    return choice.kernelName ? { name: choice.kernelName } : null;
  }
}

/** The pool's shapes that have a kernelspec here, as rows named as Lab names their kernels
 * (the gateway's display name carries a price, which has its own column). */
async function poolChoices(specs?: KernelSpec.ISpecModels | null): Promise<IChoice[]> {
  const { shapes } = await requestAPI<{ shapes: IShape[] }>('shapes');
  return shapes
    .filter(shape => !!shape.kernel_name)
    .map(shape => ({
      kernelName: shape.kernel_name,
      label:
        specs?.kernelspecs[shape.kernel_name!]?.display_name ??
        shapeLabel(shape.gpu_type, shape.gpu_count),
      shape
    }));
}

/** The kernels of this machine (every kernelspec that is not a pool shape), as rows. */
function localChoices(sessionContext: ISessionContext): IChoice[] {
  const specs = sessionContext.specsManager.specs?.kernelspecs ?? {};
  return Object.values(specs)
    .filter(spec => spec && !(spec.metadata && 'gpupool' in spec.metadata))
    .map(spec => ({ kernelName: spec!.name, label: spec!.display_name, shape: null }))
    .sort((a, b) => a.label.localeCompare(b.label));
}

/** Show `table` in a dialog, refreshing its rows every few seconds while it is open. */
async function launch(
  table: KernelTable,
  rows: () => Promise<[IChoice[], string]>,
  options: Partial<Dialog.IOptions<{ name: string } | null | undefined>>
): Promise<Dialog.IResult<{ name: string } | null | undefined>> {
  const refresh = async (): Promise<void> => {
    const [choices, note] = await rows();
    if (!table.isDisposed) {
      table.fill(choices, note);
    }
  };
  await refresh();
  const timer = window.setInterval(() => void refresh(), REFRESH_MS);
  try {
    return await showDialog({ ...options, body: table });
  } finally {
    window.clearInterval(timer);
  }
}

/** Lab's "Select Kernel" dialog as a table: the kernels of this machine beside the pool's
 * shapes with GPU, memory, price, free GPUs, queue and what picking each will do. */
export class PoolSessionDialogs extends SessionContextDialogs {
  constructor(
    options: ISessionContext.IDialogsOptions,
    private showCost: () => boolean
  ) {
    super(options);
  }

  async selectKernel(sessionContext: ISessionContext): Promise<void> {
    if (sessionContext.isDisposed) {
      return;
    }
    const current = sessionContext.hasNoKernel
      ? null
      : (sessionContext.session?.kernel?.name ?? null);
    const table = new KernelTable(this.showCost(), current);
    const rows = async (): Promise<[IChoice[], string]> => {
      let pool: IChoice[] = [];
      let note = '';
      try {
        pool = await poolChoices(sessionContext.specsManager.specs);
      } catch (error) {
        const why = error instanceof Error ? error.message : String(error);
        note = `GPU pool unavailable: ${why} Local kernels still work.`;
      }
      const none = { kernelName: null, label: 'No Kernel', shape: null };
      return [[...localChoices(sessionContext), ...pool, none], note];
    };
    const autoStart = sessionContext.kernelPreference.autoStartDefault;
    const result = await launch(table, rows, {
      title: 'Select Kernel',
      buttons: [
        Dialog.cancelButton({
          label: sessionContext.hasNoKernel ? sessionContext.kernelDisplayName : 'Cancel'
        }),
        Dialog.okButton({ label: 'Select', ariaLabel: 'Select Kernel' })
      ],
      checkbox:
        typeof autoStart === 'boolean'
          ? { label: 'Always start the preferred kernel', checked: autoStart }
          : null
    });
    if (sessionContext.isDisposed || !result.button.accept || result.value === undefined) {
      return;
    }
    if (typeof autoStart === 'boolean' && result.isChecked !== null) {
      sessionContext.kernelPreference = {
        ...sessionContext.kernelPreference,
        autoStartDefault: result.isChecked
      };
    }
    if (result.value === null) {
      if (!sessionContext.hasNoKernel) {
        await sessionContext.shutdown();
      }
      return;
    }
    if (result.value.name !== current) {
      await sessionContext.changeKernel(result.value);
    }
  }
}

/** Ask for a pool shape only and change the current notebook's kernel to it. */
export async function pickShape(tracker: INotebookTracker, showCost: boolean): Promise<void> {
  const panel = tracker.currentWidget;
  if (!panel) {
    return;
  }
  const table = new KernelTable(showCost, null);
  const rows = async (): Promise<[IChoice[], string]> => {
    try {
      return [await poolChoices(panel.sessionContext.specsManager.specs), ''];
    } catch (error) {
      const why = error instanceof Error ? error.message : String(error);
      return [[], `GPU pool unavailable: ${why}`];
    }
  };
  const result = await launch(table, rows, {
    title: 'Run this notebook on a GPU',
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Change kernel' })]
  });
  if (result.button.accept && result.value) {
    await panel.sessionContext.changeKernel(result.value);
  }
}

/** Provides Lab's session dialogs (the notebook toolbar's kernel name opens them); Lab's own
 * provider, `@jupyterlab/apputils-extension:sessionDialogs`, is disabled in package.json. */
export const sessionDialogsPlugin: JupyterFrontEndPlugin<ISessionContextDialogs> = {
  id: '@gpupool/labextension:session-dialogs',
  description: "Lab's Select Kernel dialog with the pool's GPU shapes, prices and queues.",
  autoStart: true,
  provides: ISessionContextDialogs,
  optional: [ISettingRegistry],
  activate: (_app: JupyterFrontEnd, registry: ISettingRegistry | null) => {
    let showCost = true;
    registry
      ?.load(SETTINGS_ID)
      .then(loaded => {
        const read = () => (showCost = loaded.get('showCost').composite as boolean);
        read();
        loaded.changed.connect(read);
      })
      .catch(reason => console.warn('gpupool: settings not loaded', reason));
    return new PoolSessionDialogs({ settingRegistry: registry }, () => showCost);
  }
};
