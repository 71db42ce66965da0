/**
 * The notebook dashboard's front end (an anywidget module, bundled on its own).
 *
 * The countdown ticks here, every second, from the models' absolute `expires_at`; the
 * kernel is only asked for news: every few seconds, every second while an action is under
 * way or a countdown has run out, and right after a button is pressed. The kernel answers
 * each ask on its shell thread, changing the synced state only when the models really
 * changed, and replies with its clock so the countdown stays corrected.
 */

import { AvailableModel, ModelsSnapshot, ModelsState, fromSnapshot, nextUnload } from './logic';
import { DashboardView, Pending } from './table';

const REFRESH_S = 5;

interface WidgetModel {
  get(name: string): any;
  on(event: string, callback: (...args: any[]) => void): void;
  off(event: string, callback: (...args: any[]) => void): void;
  send(content: Record<string, unknown>): void;
}

function localNow(): number {
  return Date.now() / 1000;
}

function render({ model, el }: { model: WidgetModel; el: HTMLElement }): () => void {
  let state: ModelsState = fromSnapshot(model.get('snapshot') as ModelsSnapshot, localNow());
  let lastAsk = localNow();

  const ask = () => {
    lastAsk = localNow();
    model.send({ type: 'refresh' });
  };
  const view = new DashboardView({
    load: id => {
      model.send({ type: 'load', model: id });
    },
    unload: id => {
      model.send({ type: 'unload', model: id });
    }
  });
  const caption = document.createElement('div');
  caption.className = 'mlx-dashboard-host';
  caption.textContent = `MLX models served by ${model.get('host')}`;
  el.append(caption, view.node);

  const draw = () => {
    view.update(
      {
        state,
        available: model.get('available') as AvailableModel[],
        error: model.get('error') as string,
        pending: model.get('pending') as Pending,
        reachable: model.get('reachable') !== false
      },
      localNow()
    );
  };
  const onSnapshot = () => {
    state = fromSnapshot(model.get('snapshot') as ModelsSnapshot, localNow());
    draw();
  };
  const onMessage = (content: { type?: string; server_time?: number }) => {
    if (content.type === 'clock' && typeof content.server_time === 'number') {
      state = { ...state, clockOffset: content.server_time - localNow() };
    }
  };
  const tick = () => {
    draw();
    const waiting = Object.keys(model.get('pending') as Pending).length > 0;
    const next = nextUnload(state, localNow());
    const due = waiting || (next !== null && next <= 0) ? 1 : REFRESH_S;
    if (localNow() - lastAsk >= due) {
      ask();
    }
  };

  model.on('change:snapshot', onSnapshot);
  model.on('change:available', draw);
  model.on('change:error', draw);
  model.on('change:pending', draw);
  model.on('change:reachable', draw);
  model.on('msg:custom', onMessage);
  const timer = window.setInterval(tick, 1000);
  draw();
  ask();
  return () => {
    window.clearInterval(timer);
    model.off('change:snapshot', onSnapshot);
    model.off('change:available', draw);
    model.off('change:error', draw);
    model.off('change:pending', draw);
    model.off('change:reachable', draw);
    model.off('msg:custom', onMessage);
  };
}

export default { render };
