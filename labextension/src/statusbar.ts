/** The status bar item: "MLX: 2 loaded · next unload 4:12", ticking every second. */

import { Widget } from '@lumino/widgets';

import { statusBarText } from './logic';
import { ModelsModel } from './model';

export class ModelsStatusItem extends Widget {
  private readonly timer: number;

  constructor(private readonly model: ModelsModel) {
    super();
    this.addClass('mlx-status-item');
    this.node.title = 'Loaded MLX models (click to open the MLX models panel)';
    model.changed.connect(this.render, this);
    this.timer = window.setInterval(() => this.render(), 1000);
    this.render();
  }

  render(): void {
    this.node.textContent = statusBarText(this.model.state, Date.now() / 1000);
  }

  dispose(): void {
    window.clearInterval(this.timer);
    this.model.changed.disconnect(this.render, this);
    super.dispose();
  }
}
