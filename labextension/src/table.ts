/**
 * The models list with its load control, in plain DOM: the JupyterLab panel and the
 * notebook widget both render through it.
 */

import {
  AvailableModel,
  ModelsState,
  countdownText,
  formatAge,
  formatBytes,
  loadingText,
  serverNow,
  stateKind,
  stateLabel
} from './logic';

/** What the user can do from the list. */
export interface DashboardActions {
  load(modelId: string): void;
  unload(modelId: string): void;
}

/** An action under way, per model id. */
export type Pending = Record<string, 'load' | 'unload'>;

/** Everything the list shows. */
export interface DashboardData {
  state: ModelsState;
  available: AvailableModel[];
  error: string;
  pending: Pending;
  /** False while the server does not answer: nothing can be loaded then. */
  reachable: boolean;
}

interface Row {
  node: HTMLElement;
  state: HTMLElement;
  countdown: HTMLElement;
  details: HTMLElement;
  button: HTMLButtonElement;
  /** Server time when this view first saw the model loading, for the elapsed time. */
  loadingSince: number | null;
}

/** JupyterLab's own button classes (from @jupyterlab/ui-components), so both themes style them. */
const BUTTON_CLASSES = ['jp-Button', 'jp-mod-styled', 'jp-mod-small'];

/** The id with break opportunities after its separators, so a narrow panel never splits a word. */
function breakableId(id: string): Node[] {
  const parts = id.split(/(?<=[:/_.-])/).map(part => document.createTextNode(part));
  return parts.flatMap((part, i) => (i === 0 ? [part] : [document.createElement('wbr'), part]));
}

function element<K extends keyof HTMLElementTagNameMap>(tag: K, className: string, text = ''): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = text;
  return node;
}

/**
 * Keeps one entry per model and updates it in place, so a tick every second never
 * replaces a button under the pointer or resets the model chooser.
 */
export class DashboardView {
  readonly node: HTMLDivElement;
  /** The model chooser: the panel wraps it in JupyterLab's styled select. */
  readonly select: HTMLSelectElement;
  private readonly rows = new Map<string, Row>();
  private readonly list: HTMLDivElement;
  private readonly empty: HTMLDivElement;
  private readonly loadButton: HTMLButtonElement;
  private readonly errorLine: HTMLDivElement;
  private availableKey = '';

  constructor(private readonly actions: DashboardActions) {
    this.node = element('div', 'mlx-dashboard');
    this.list = element('div', 'mlx-models');
    this.empty = element('div', 'mlx-empty', 'No model loaded.');

    const controls = element('div', 'mlx-load');
    this.select = element('select', 'mlx-load-select jp-mod-styled');
    this.select.title = 'A model to load';
    this.loadButton = element('button', 'mlx-load-button jp-mod-accept', 'Load');
    this.loadButton.classList.add(...BUTTON_CLASSES);
    this.loadButton.addEventListener('click', () => {
      if (this.select.value) {
        this.actions.load(this.select.value);
      }
    });
    controls.append(this.select, this.loadButton);

    this.errorLine = element('div', 'mlx-error');
    this.node.append(this.list, this.empty, controls, this.errorLine);
  }

  /** Show `data` as of `localNow` (epoch seconds of the local clock). */
  update(data: DashboardData, localNow: number): void {
    const now = serverNow(data.state, localNow);
    const seen = new Set<string>();
    for (const model of data.state.models) {
      seen.add(model.id);
      const row = this.rows.get(model.id) ?? this.addRow(model.id);
      const kind = stateKind(model);
      row.node.dataset.state = kind;
      row.state.textContent = stateLabel(model);
      if (kind === 'loading') {
        row.loadingSince ??= now;
        row.countdown.textContent = loadingText(now - row.loadingSince);
      } else {
        row.loadingSince = null;
        row.countdown.textContent = countdownText(model, now);
      }
      row.countdown.hidden = !row.countdown.textContent;
      const details = [
        model.memory_bytes > 0 ? formatBytes(model.memory_bytes) : '',
        model.loaded_at === null ? '' : `loaded ${formatAge(now - model.loaded_at)} ago`
      ].filter(Boolean);
      row.details.textContent = details.join(' · ');
      row.details.hidden = details.length === 0;
      row.details.title = model.loaded_at === null ? '' : new Date(model.loaded_at * 1000).toLocaleString();
      const unloading = data.pending[model.id] === 'unload' || kind === 'unloading';
      row.button.disabled = unloading || kind === 'loading' || !data.reachable;
      row.button.textContent = unloading ? 'Unloading…' : 'Unload';
      row.button.title =
        kind === 'loading'
          ? `${model.id} is loading: unload it once it is ready`
          : `Unload ${model.id} once its requests finish`;
    }
    for (const [id, row] of this.rows) {
      if (!seen.has(id)) {
        row.node.remove();
        this.rows.delete(id);
      }
    }
    // Entries stay in id order (the state is sorted).
    for (const model of data.state.models) {
      this.list.appendChild(this.rows.get(model.id)!.node);
    }
    this.empty.hidden = data.state.models.length > 0;
    this.empty.textContent = data.reachable ? 'No model loaded.' : 'The MLX server does not answer.';

    const key = data.available.map(m => m.id).join('\n');
    if (key !== this.availableKey) {
      this.availableKey = key;
      const chosen = this.select.value;
      this.select.replaceChildren(
        ...data.available.map(m => {
          const option = document.createElement('option');
          option.value = m.id;
          option.textContent = `${m.id} (${m.source})`;
          return option;
        })
      );
      if (data.available.some(m => m.id === chosen)) {
        this.select.value = chosen;
      }
    }
    const loading = data.pending[this.select.value] === 'load';
    this.loadButton.disabled = !this.select.value || loading || !data.reachable;
    this.loadButton.textContent = loading ? 'Loading…' : 'Load';
    this.loadButton.title = data.reachable ? 'Load the chosen model' : 'The MLX server does not answer';
    this.errorLine.textContent = data.error;
    this.errorLine.hidden = !data.error;
  }

  private addRow(id: string): Row {
    const node = element('div', 'mlx-model');
    node.dataset.model = id;
    const head = element('div', 'mlx-model-head');
    const name = element('span', 'mlx-model-id');
    name.append(...breakableId(id));
    name.title = id;
    const button = element('button', 'mlx-unload-button jp-mod-reject', 'Unload');
    button.classList.add(...BUTTON_CLASSES);
    button.addEventListener('click', () => this.actions.unload(id));
    head.append(name, button);
    const status = element('div', 'mlx-model-status');
    const state = element('span', 'mlx-model-state');
    const countdown = element('span', 'mlx-model-countdown');
    status.append(state, countdown);
    const details = element('div', 'mlx-model-details');
    node.append(head, status, details);
    const row = { node, state, countdown, details, button, loadingSince: null };
    this.rows.set(id, row);
    return row;
  }
}
