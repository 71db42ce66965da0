/** The "MLX models" side panel: the models list, ticking every second while shown. */

import { LabIcon, Styling } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { ModelsModel } from './model';
import { DashboardView } from './table';

export class ModelsPanel extends Widget {
  private readonly view: DashboardView;
  private readonly status: HTMLDivElement;

  constructor(
    private readonly model: ModelsModel,
    icon: LabIcon
  ) {
    super();
    this.id = 'mlx-models-panel';
    this.addClass('mlx-panel');
    this.title.icon = icon;
    this.title.caption = 'MLX models';
    const heading = document.createElement('h2');
    heading.textContent = 'MLX models';
    this.status = document.createElement('div');
    this.status.className = 'mlx-panel-mode';
    this.view = new DashboardView({
      load: id => void model.load(id),
      unload: id => void model.unload(id)
    });
    Styling.wrapSelect(this.view.select); // JupyterLab's select, with its caret, in every theme
    this.node.append(heading, this.view.node, this.status);
    model.changed.connect(this.render, this);
  }

  render(): void {
    this.view.update(this.model.data, Date.now() / 1000);
    this.status.textContent =
      this.model.mode === 'events' ? 'live (server events)' : 'polling the server';
  }

  protected onAfterShow(msg: Message): void {
    void this.model.refreshAvailable();
    this.render();
    this.model.ticked.connect(this.render, this);
  }

  protected onBeforeHide(msg: Message): void {
    this.model.ticked.disconnect(this.render, this);
  }

  dispose(): void {
    this.model.ticked.disconnect(this.render, this);
    this.model.changed.disconnect(this.render, this);
    super.dispose();
  }
}
