import { JupyterFrontEnd } from '@jupyterlab/application';
import {
  Clipboard,
  Dialog,
  ICommandPalette,
  InputDialog,
  Notification,
  showDialog
} from '@jupyterlab/apputils';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { linkIcon, ToolbarButton } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { requestAPI, shapeLabel } from './api';

export const SHARE_COMMAND = 'gpupool:share-notebook';
export const OPEN_SHARED_COMMAND = 'gpupool:open-shared';

/** What the share dialog asks; sent to POST /gpupool/shares with the notebook's path. */
interface IShareOptions {
  mode: 'view' | 'run';
  outputs: 'keep' | 'strip';
  access: 'anyone' | 'gateway' | 'tenants';
  tenants?: string[];
  expires_in: number | null;
}

/** POST /gpupool/shares's answer (the gateway's share model, the link, the package count). */
interface IShared {
  id: string;
  link: string;
  name: string;
  mode: string;
  access: string;
  tenants: string[];
  kernel_name: string;
  gpu_type: string | null;
  gpu_count: number;
  expires: string | null;
  packages: number;
}

/** POST /gpupool/shares/open's answer: the copy written to this workspace. */
interface IOpened {
  path: string;
  kernel_name: string;
  kernel_display_name: string;
  gpu_type: string | null;
  gpu_count: number;
  shared_by: string;
  name: string;
  python: string | null;
  packages: number;
}

/** POST /gpupool/shares/differences's answer. */
interface IDifferences {
  recorded: boolean;
  python: { shared: string | null; yours: string | null };
  differ: { name: string; shared: string; yours: string | null }[];
  same: number;
}

const EXPIRY: [string, number | null][] = [
  ['never', null],
  ['in 1 hour', 3600],
  ['in 1 day', 86400],
  ['in 7 days', 7 * 86400],
  ['in 30 days', 30 * 86400]
];
const MAX_ROWS = 200; // package differences listed; the rest counted

function shape(gpuType: string | null, count: number): string {
  return gpuType && count ? shapeLabel(gpuType, count) : 'CPU';
}

function post<T>(path: string, body: unknown): Promise<T> {
  return requestAPI<T>(path, { method: 'POST', body: JSON.stringify(body) });
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function field(label: string, control: HTMLElement): HTMLLabelElement {
  const row = document.createElement('label');
  row.className = 'gpupool-share-field';
  const name = document.createElement('span');
  name.textContent = label;
  row.append(name, control);
  return row;
}

function select(name: string, choices: [string, string][]): HTMLSelectElement {
  const element = document.createElement('select');
  element.name = name;
  element.className = 'jp-mod-styled';
  for (const [value, text] of choices) {
    element.add(new Option(text, value));
  }
  return element;
}

/** The share dialog's form: mode, outputs, access (and named tenants), expiry. */
class ShareForm extends Widget {
  private mode = select('mode', [
    ['view', 'View: a read-only page'],
    ['run', 'Run: tenants may open their own copy on the same GPU shape']
  ]);
  private outputs = select('outputs', [
    ['keep', 'Keep outputs'],
    ['strip', 'Strip outputs']
  ]);
  private access = select('access', [
    ['gateway', 'Any tenant of this gateway'],
    ['anyone', 'Anyone with the link'],
    ['tenants', 'Only the tenants named below']
  ]);
  private tenants = document.createElement('input');
  private expiry = select(
    'expiry',
    EXPIRY.map(([text], index) => [String(index), text])
  );

  constructor(path: string, kernel: string) {
    super();
    this.addClass('gpupool-share-form');
    const intro = document.createElement('p');
    intro.textContent =
      `${path} as saved now, with the packages its kernel (${kernel}) reports. ` +
      'The link is a snapshot: later edits are not shared.';
    this.tenants.name = 'tenants';
    this.tenants.className = 'jp-mod-styled';
    this.tenants.placeholder = 'tenant names, comma separated';
    this.tenants.disabled = true;
    this.access.addEventListener('change', () => {
      this.tenants.disabled = this.access.value !== 'tenants';
    });
    this.node.append(
      intro,
      field('Mode', this.mode),
      field('Outputs', this.outputs),
      field('Who may open it', this.access),
      field('Tenants', this.tenants),
      field('Expires', this.expiry)
    );
  }

  getValue(): IShareOptions {
    const options: IShareOptions = {
      mode: this.mode.value as IShareOptions['mode'],
      outputs: this.outputs.value as IShareOptions['outputs'],
      access: this.access.value as IShareOptions['access'],
      expires_in: EXPIRY[Number(this.expiry.value)][1]
    };
    if (options.access === 'tenants') {
      options.tenants = this.tenants.value
        .split(',')
        .map(name => name.trim())
        .filter(name => name);
    }
    return options;
  }
}

/** The link, selectable, with what it is. */
function linkBox(made: IShared, copied: boolean): Widget {
  const box = new Widget();
  box.addClass('gpupool-share-link');
  const input = document.createElement('input');
  input.readOnly = true;
  input.value = made.link;
  input.className = 'jp-mod-styled';
  input.addEventListener('focus', () => input.select());
  const who =
    made.access === 'anyone'
      ? 'anyone with the link'
      : made.access === 'gateway'
        ? 'any tenant of this gateway'
        : `the tenants ${made.tenants.join(', ')}`;
  const about = document.createElement('p');
  about.textContent =
    `${made.mode === 'run' ? 'Run' : 'View'} link to ${made.name} on ` +
    `${shape(made.gpu_type, made.gpu_count)}, for ${who}; ` +
    `${made.packages ? `${made.packages} packages recorded` : 'no package list (no kernel)'}; ` +
    `expires ${made.expires ? made.expires.slice(0, 16).replace('T', ' ') + ' UTC' : 'never'}.`;
  const state = document.createElement('p');
  state.textContent = copied
    ? 'Copied to the clipboard.'
    : 'Copy it from the box above (the clipboard was not available).';
  box.node.append(input, about, state);
  return box;
}

/** Share the notebook in `panel`: ask the options, save, create the link, copy and show it. */
export async function shareNotebook(panel: NotebookPanel): Promise<void> {
  const kernel = panel.sessionContext.session?.kernel ?? null;
  const form = new ShareForm(panel.context.path, kernel?.name ?? 'none running');
  const result = await showDialog({
    title: 'Share notebook link',
    body: form,
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Create link' })]
  });
  if (!result.button.accept || !result.value) {
    return;
  }
  const options = result.value as IShareOptions;
  if (options.access === 'tenants' && !options.tenants?.length) {
    Notification.warning('Name at least one tenant to share with, or choose another access.');
    return;
  }
  const pending = Notification.emit('Creating the link (asking the kernel for its packages)…',
    'in-progress', { autoClose: false }); // prettier-ignore
  let made: IShared;
  try {
    if (panel.context.model.dirty) {
      await panel.context.save();
    }
    made = await post<IShared>('shares', {
      path: panel.context.path,
      ...options,
      ...(kernel ? { kernel_id: kernel.id } : {})
    });
  } catch (error) {
    Notification.error(`Not shared: ${message(error)}`, { autoClose: false });
    return;
  } finally {
    Notification.dismiss(pending);
  }
  let copied = true;
  try {
    Clipboard.copyToSystem(made.link);
  } catch {
    copied = false;
  }
  await showDialog({
    title: 'Notebook link created',
    body: linkBox(made, copied),
    buttons: [Dialog.okButton({ label: 'Done' })]
  });
}

function differencesBody(diff: IDifferences, opened: IOpened): Widget {
  const box = new Widget();
  box.addClass('gpupool-share-differences');
  const python = document.createElement('p');
  python.textContent =
    diff.python.shared === diff.python.yours
      ? `Python ${diff.python.yours ?? '?'} on both.`
      : `Python: shared ${diff.python.shared ?? 'not recorded'}, yours ${diff.python.yours ?? '?'}.`;
  const summary = document.createElement('p');
  summary.textContent =
    `${diff.differ.length} of the ${opened.packages} packages of ${opened.shared_by}'s kernel ` +
    `differ from your kernel's (${diff.same} the same):`;
  const table = document.createElement('table');
  const head = table.createTHead().insertRow();
  for (const name of ['package', `${opened.shared_by}'s`, 'yours']) {
    const th = document.createElement('th');
    th.textContent = name;
    head.appendChild(th);
  }
  const rows = table.createTBody();
  for (const entry of diff.differ.slice(0, MAX_ROWS)) {
    const row = rows.insertRow();
    for (const text of [entry.name, entry.shared, entry.yours ?? 'missing']) {
      row.insertCell().textContent = text;
    }
  }
  box.node.append(python, summary, table);
  if (diff.differ.length > MAX_ROWS) {
    const more = document.createElement('p');
    more.textContent = `…and ${diff.differ.length - MAX_ROWS} more.`;
    box.node.appendChild(more);
  }
  return box;
}

/** Compare the copy's packages with its kernel's, once that kernel answers. */
async function showDifferences(panel: NotebookPanel, opened: IOpened): Promise<void> {
  if (!opened.packages) {
    Notification.info(`${opened.name} was shared without a package list; nothing to compare.`);
    return;
  }
  await panel.sessionContext.ready;
  const kernel = panel.sessionContext.session?.kernel;
  if (!kernel) {
    return;
  }
  let diff: IDifferences;
  try {
    diff = await post<IDifferences>('shares/differences', {
      path: opened.path,
      kernel_id: kernel.id
    });
  } catch (error) {
    Notification.warning(`Packages not compared: ${message(error)}`, { autoClose: 10000 });
    return;
  }
  if (diff.differ.length === 0 && diff.python.shared === diff.python.yours) {
    Notification.success(
      `Your kernel has the same ${diff.same} package versions as ${opened.shared_by}'s.`,
      { autoClose: 10000 }
    );
    return;
  }
  await showDialog({
    title: 'Package differences',
    body: differencesBody(diff, opened),
    buttons: [Dialog.okButton({ label: 'OK' })]
  });
}

/** Ask for a link, write the copy, open it on its shape's kernel, compare packages. */
export async function openShared(app: JupyterFrontEnd, link?: string): Promise<void> {
  if (!link) {
    const asked = await InputDialog.getText({
      title: 'Open shared notebook',
      label: 'Paste the link someone shared with you (https://GATEWAY/s/ID):',
      placeholder: 'https://gateway/s/…',
      okLabel: 'Open my copy'
    });
    if (!asked.button.accept || !asked.value) {
      return;
    }
    link = asked.value;
  }
  let opened: IOpened;
  try {
    opened = await post<IOpened>('shares/open', { link: link.trim() });
  } catch (error) {
    Notification.error(`Not opened: ${message(error)}`, { autoClose: false });
    return;
  }
  const panel = (await app.commands.execute('docmanager:open', {
    path: opened.path,
    factory: 'Notebook',
    kernel: { name: opened.kernel_name }
  })) as NotebookPanel;
  Notification.info(
    `Your copy of ${opened.name}, shared by ${opened.shared_by}, is ${opened.path}: it runs ` +
      `on your own ${shape(opened.gpu_type, opened.gpu_count)} kernel, billed to you.`,
    { autoClose: 8000 }
  );
  if (panel && panel.sessionContext) {
    await showDifferences(panel, opened);
  }
}

/** The two commands, in the palette and the File menu, and a Share button on each notebook. */
export function registerSharing(
  app: JupyterFrontEnd,
  notebooks: INotebookTracker,
  palette: ICommandPalette | null,
  mainMenu: IMainMenu | null
): void {
  app.commands.addCommand(SHARE_COMMAND, {
    label: 'Share notebook link\u2026',
    caption: 'A link to a snapshot of this notebook: a read-only page, or a copy to run',
    icon: linkIcon,
    isEnabled: () => !!notebooks.currentWidget,
    execute: async () => {
      const panel = notebooks.currentWidget;
      if (panel) {
        await shareNotebook(panel);
      }
    }
  });
  app.commands.addCommand(OPEN_SHARED_COMMAND, {
    label: 'Open shared notebook\u2026',
    caption: 'Your own copy of a shared run link, on a kernel of its GPU shape',
    execute: async args => openShared(app, (args.link as string) || undefined)
  });
  for (const command of [SHARE_COMMAND, OPEN_SHARED_COMMAND]) {
    palette?.addItem({ command, category: 'GPU Pool' });
  }
  mainMenu?.fileMenu.addGroup([{ command: SHARE_COMMAND }, { command: OPEN_SHARED_COMMAND }], 40);
  notebooks.widgetAdded.connect((_, panel) => {
    const button = new ToolbarButton({
      icon: linkIcon,
      label: 'Share',
      tooltip: 'Share notebook link\u2026',
      onClick: () => void shareNotebook(panel)
    });
    button.addClass('gpupool-share-button');
    panel.toolbar.addItem('gpupool-share', button);
  });
}
