/** The status bar item: "MLX: 1 busy, 1 idle · next unload 4:12", ticking every second. */

import { Widget } from '@lumino/widgets';

import { statusBarText } from './logic';
import { ModelsModel } from './model';

export class ModelsStatusItem extends Widget {
  constructor(private readonly model: ModelsModel) {
    super();
    this.addClass('mlx-status-item');
    this.node.title = 'Loaded MLX models (click to open the MLX models panel)';
    model.changed.connect(this.render, this);
    model.ticked.connect(this.render, this);
    this.render();
  }

  render(): void {
    this.node.textContent = statusBarText(this.model.state, Date.now() / 1000, this.model.reachable);
  }

  dispose(): void {
    this.model.changed.disconnect(this.render, this);
    this.model.ticked.disconnect(this.render, this);
    super.dispose();
  }
}
