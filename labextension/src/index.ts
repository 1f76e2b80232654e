import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, WidgetTracker } from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { CellGpu } from './cellgpu';
import { ClosingGuard } from './closing';
import { KernelSetup } from './kernelsetup';
import { PoolLauncher } from './launcher';
import { pickShape, PICK_COMMAND, sessionDialogsPlugin } from './picker';
import { registerSharing } from './share';
import { KernelStatus } from './status';
import { UsagePanel } from './usage';

const PLUGIN_ID = '@gpupool/labextension:plugin';
const USAGE_COMMAND = 'gpupool:usage';

/** The pool's GPU shapes in the launcher, the kernel's state and cost in the status bar, and
 * a usage panel; all through this Jupyter server's /gpupool/ routes. */
const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'gpupool: pool GPUs beside local kernels, with price, queue and live cost.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [
    ILauncher,
    IStatusBar,
    ICommandPalette,
    ISettingRegistry,
    ILayoutRestorer,
    IMainMenu
  ],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    launcher: ILauncher | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    registry: ISettingRegistry | null,
    restorer: ILayoutRestorer | null,
    mainMenu: IMainMenu | null
  ) => {
    const settings = { showCost: true, defaultShape: '', refreshSeconds: 30, idleTimeout: 0 };
    const options = {
      showCost: () => settings.showCost,
      defaultShape: () => settings.defaultShape,
      refreshSeconds: () => settings.refreshSeconds
    };
    const pool = launcher ? new PoolLauncher(app, launcher, options) : null;
    new ClosingGuard(notebooks); // closing a running pool kernel's last tab asks first
    const kernels = new KernelSetup(() => settings); // %%gpu's default shape, idle timeout
    kernels.track(notebooks);
    new CellGpu(app, notebooks, options); // Run Cell on GPU: a %%gpu first line, a badge
    registerSharing(app, notebooks, palette, mainMenu); // Share notebook link…, Open shared…

    if (statusBar) {
      const status = new KernelStatus(notebooks, () => pool?.shapes ?? [], options.showCost);
      statusBar.registerStatusItem('gpupool:kernel', {
        item: status,
        align: 'left',
        rank: 5,
        isActive: () => true
      });
    }

    const tracker = new WidgetTracker<MainAreaWidget<UsagePanel>>({ namespace: 'gpupool' });
    app.commands.addCommand(USAGE_COMMAND, {
      label: 'GPU Pool: Show Usage (last 30 days)',
      execute: async () => {
        let widget = tracker.currentWidget;
        if (!widget || widget.isDisposed) {
          widget = new MainAreaWidget({ content: new UsagePanel() });
          widget.id = 'gpupool-usage-panel';
          widget.title.label = 'GPU usage';
          widget.title.closable = true;
          await tracker.add(widget);
          app.shell.add(widget, 'main');
        }
        app.shell.activateById(widget.id);
        await widget.content.refresh();
        return widget;
      }
    });
    app.commands.addCommand(PICK_COMMAND, {
      label: 'GPU Pool: Change Kernel to a GPU Shape\u2026',
      isEnabled: () => !!notebooks.currentWidget && (pool?.shapes.length ?? 0) > 0,
      execute: () => pickShape(notebooks, settings.showCost)
    });
    palette?.addItem({ command: PICK_COMMAND, category: 'GPU Pool' });
    mainMenu?.kernelMenu.addGroup([{ command: PICK_COMMAND }], 100);
    palette?.addItem({ command: USAGE_COMMAND, category: 'GPU Pool' });
    mainMenu?.viewMenu.addGroup([{ command: USAGE_COMMAND }], 100);
    if (restorer) {
      void restorer.restore(tracker, { command: USAGE_COMMAND, name: () => 'gpupool-usage' });
    }

    const apply = (loaded: ISettingRegistry.ISettings) => {
      settings.showCost = loaded.get('showCost').composite as boolean;
      settings.defaultShape = loaded.get('defaultShape').composite as string;
      settings.refreshSeconds = loaded.get('refreshSeconds').composite as number;
      settings.idleTimeout = loaded.get('idleTimeout').composite as number;
      pool?.redraw();
      kernels.update();
    };
    if (registry) {
      registry
        .load(PLUGIN_ID)
        .then(loaded => {
          apply(loaded);
          loaded.changed.connect(apply);
        })
        .catch(reason => console.warn('gpupool: settings not loaded', reason))
        .finally(() => pool?.start());
    } else {
      pool?.start();
    }
  }
};

export default [plugin, sessionDialogsPlugin];
