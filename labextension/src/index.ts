/** mlx-jupyter's JupyterLab plugin: the "MLX models" sidebar panel and a status bar item. */

import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { ModelsModel } from './model';
import { ModelsPanel } from './panel';
import { ModelsStatusItem } from './statusbar';

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">
<g class="jp-icon3" fill="#616161"><rect x="1" y="2" width="14" height="3" rx="1"/>
<rect x="1" y="6.5" width="14" height="3" rx="1"/><rect x="1" y="11" width="9" height="3" rx="1"/></g></svg>`;

export const mlxIcon = new LabIcon({ name: 'mlx-jupyter:models', svgstr: ICON_SVG });

const OPEN_COMMAND = 'mlx-jupyter:open-models';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'mlx-jupyter:plugin',
  description: 'Loaded MLX models with idle countdowns: a sidebar panel and a status bar item.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ILayoutRestorer, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell,
    restorer: ILayoutRestorer | null,
    statusBar: IStatusBar | null
  ) => {
    const model = new ModelsModel();
    const panel = new ModelsPanel(model, mlxIcon);
    labShell.add(panel, 'left', { rank: 600 });
    restorer?.add(panel, panel.id);

    app.commands.addCommand(OPEN_COMMAND, {
      label: 'Show MLX models',
      execute: () => labShell.activateById(panel.id)
    });

    if (statusBar) {
      const item = new ModelsStatusItem(model);
      item.node.addEventListener('click', () => void app.commands.execute(OPEN_COMMAND));
      statusBar.registerStatusItem('mlx-jupyter:status', { item, align: 'left', rank: 4 });
    }
  }
};

export default plugin;
