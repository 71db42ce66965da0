/**
 * mlx-jupyter's plugins for JupyterLab and Jupyter Notebook 7: the "MLX models" side panel,
 * a status item, the "Open MLX models" command, and saved dashboards shown as snapshots.
 */

import { IJupyterWidgetRegistry } from '@jupyter-widgets/base';
import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { ModelsModel } from './model';
import { ModelsPanel } from './panel';
import { fallBackToSnapshots } from './saved';
import { ModelsStatusItem } from './statusbar';

// A chip with pins: not a list, so it is not taken for the table of contents.
const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">
<g class="jp-icon3" fill="#616161"><path d="M5 1h1v2H5zM7.5 1h1v2h-1zM10 1h1v2h-1zM5 13h1v2H5zM7.5 13h1v2h-1zM10 13h1v2h-1z
M1 5h2v1H1zM1 7.5h2v1H1zM1 10h2v1H1zM13 5h2v1h-2zM13 7.5h2v1h-2zM13 10h2v1h-2z"/>
<path fill-rule="evenodd" d="M4 3h8a1 1 0 0 1 1 1v8a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V4a1 1 0 0 1 1-1zm1.5 2.5v5h5v-5z"/></g></svg>`;

export const mlxIcon = new LabIcon({ name: 'mlx-jupyter:models', svgstr: ICON_SVG });

const OPEN_COMMAND = 'mlx-jupyter:open-models';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'mlx-jupyter:plugin',
  description: 'Loaded MLX models with idle countdowns: a side panel, a status item and an "Open MLX models" command.',
  autoStart: true,
  // Notebook 7 has neither ILabShell nor a status bar: the panel goes to its left area
  // through the generic shell, and the status item to its top bar.
  optional: [ILabShell, ILayoutRestorer, IStatusBar, ICommandPalette, IMainMenu],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    mainMenu: IMainMenu | null
  ) => {
    const model = new ModelsModel();
    const panel = new ModelsPanel(model, mlxIcon);
    app.shell.add(panel, 'left', { rank: 600, type: 'MLX models' });
    restorer?.add(panel, panel.id);

    app.commands.addCommand(OPEN_COMMAND, {
      label: 'Open MLX models',
      caption: 'Show the loaded MLX models, their idle countdowns, load and unload',
      icon: mlxIcon,
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: OPEN_COMMAND, category: 'MLX' });
    mainMenu?.viewMenu.addGroup([{ command: OPEN_COMMAND }], 5);

    const item = new ModelsStatusItem(model);
    item.node.addEventListener('click', () => void app.commands.execute(OPEN_COMMAND));
    if (statusBar) {
      statusBar.registerStatusItem('mlx-jupyter:status', { item, align: 'left', rank: 4 });
    } else if (!labShell) {
      item.addClass('mlx-status-item-top');
      app.shell.add(item, 'top', { rank: 900 });
    }
  }
};

/** Saved dashboards: needs the widget manager's renderer, so it starts after it. */
const savedDashboards: JupyterFrontEndPlugin<void> = {
  id: 'mlx-jupyter:saved-dashboards',
  description: 'A reopened notebook shows a saved MLX dashboard as its static snapshot.',
  autoStart: true,
  requires: [IRenderMimeRegistry],
  optional: [IJupyterWidgetRegistry],
  activate: (app: JupyterFrontEnd, rendermime: IRenderMimeRegistry) => fallBackToSnapshots(rendermime)
};

export default [plugin, savedDashboards];
