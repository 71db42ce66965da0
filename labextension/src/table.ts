/**
 * The models table with its load control, in plain DOM: the JupyterLab panel and the
 * notebook widget both render through it.
 */

import {
  AvailableModel,
  ModelsState,
  countdownText,
  formatAge,
  formatBytes,
  serverNow,
  stateKind,
  stateLabel
} from './logic';

/** What the user can do from the table. */
export interface DashboardActions {
  load(modelId: string): void;
  unload(modelId: string): void;
}

/** An action under way, per model id. */
export type Pending = Record<string, 'load' | 'unload'>;

/** Everything the table shows. */
export interface DashboardData {
  state: ModelsState;
  available: AvailableModel[];
  error: string;
  pending: Pending;
}

interface Row {
  tr: HTMLTableRowElement;
  state: HTMLElement;
  memory: HTMLElement;
  since: HTMLElement;
  countdown: HTMLElement;
  button: HTMLButtonElement;
}

// Memory and load time sit under the model id, so the table fits a narrow sidebar.
const COLUMNS = ['model', 'state', 'idle unload', ''];

/**
 * Keeps one table row per model and updates its cells in place, so a tick every second
 * never replaces a button under the pointer or resets the model chooser.
 */
export class DashboardView {
  readonly node: HTMLDivElement;
  private readonly rows = new Map<string, Row>();
  private readonly tbody: HTMLTableSectionElement;
  private readonly empty: HTMLDivElement;
  private readonly select: HTMLSelectElement;
  private readonly loadButton: HTMLButtonElement;
  private readonly errorLine: HTMLDivElement;
  private availableKey = '';

  constructor(private readonly actions: DashboardActions) {
    this.node = document.createElement('div');
    this.node.className = 'mlx-dashboard';

    const table = document.createElement('table');
    table.className = 'mlx-models';
    const head = table.createTHead().insertRow();
    for (const title of COLUMNS) {
      const th = document.createElement('th');
      th.textContent = title;
      head.appendChild(th);
    }
    this.tbody = table.createTBody();
    this.empty = document.createElement('div');
    this.empty.className = 'mlx-empty';
    this.empty.textContent = 'No model loaded.';

    const controls = document.createElement('div');
    controls.className = 'mlx-load';
    this.select = document.createElement('select');
    this.select.className = 'mlx-load-select';
    this.select.title = 'A model to load';
    this.loadButton = document.createElement('button');
    this.loadButton.className = 'mlx-load-button';
    this.loadButton.textContent = 'Load';
    this.loadButton.addEventListener('click', () => {
      if (this.select.value) {
        this.actions.load(this.select.value);
      }
    });
    controls.append(this.select, this.loadButton);

    this.errorLine = document.createElement('div');
    this.errorLine.className = 'mlx-error';

    this.node.append(table, this.empty, controls, this.errorLine);
  }

  /** Show `data` as of `localNow` (epoch seconds of the local clock). */
  update(data: DashboardData, localNow: number): void {
    const now = serverNow(data.state, localNow);
    const seen = new Set<string>();
    for (const model of data.state.models) {
      seen.add(model.id);
      const row = this.rows.get(model.id) ?? this.addRow(model.id);
      row.tr.dataset.state = stateKind(model);
      row.state.textContent = stateLabel(model);
      row.memory.textContent = formatBytes(model.memory_bytes);
      row.since.textContent = model.loaded_at === null ? '' : `loaded ${formatAge(now - model.loaded_at)} ago`;
      row.since.title = model.loaded_at === null ? '' : new Date(model.loaded_at * 1000).toLocaleString();
      row.countdown.textContent = countdownText(model, now);
      const busy = data.pending[model.id] === 'unload' || stateKind(model) === 'unloading';
      row.button.disabled = busy;
      row.button.textContent = busy ? 'Unloading…' : 'Unload';
    }
    for (const [id, row] of this.rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        this.rows.delete(id);
      }
    }
    // Rows stay in id order (the state is sorted).
    for (const model of data.state.models) {
      this.tbody.appendChild(this.rows.get(model.id)!.tr);
    }
    this.empty.hidden = data.state.models.length > 0;

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
    this.loadButton.disabled = !this.select.value || loading;
    this.loadButton.textContent = loading ? 'Loading…' : 'Load';
    this.errorLine.textContent = data.error;
    this.errorLine.hidden = !data.error;
  }

  private addRow(id: string): Row {
    const tr = this.tbody.insertRow();
    tr.className = 'mlx-model';
    tr.dataset.model = id;
    const [model, state, countdown, action] = COLUMNS.map(() => tr.insertCell());
    const span = (className: string, text = '') => {
      const node = document.createElement('span');
      node.className = className;
      node.textContent = text;
      return node;
    };
    const details = span('mlx-model-details');
    const memory = span('mlx-model-memory');
    const since = span('mlx-model-since');
    details.append(memory, ' · ', since);
    model.append(span('mlx-model-id', id), details);
    state.className = 'mlx-model-state';
    countdown.className = 'mlx-model-countdown';
    const button = document.createElement('button');
    button.className = 'mlx-unload-button';
    button.textContent = 'Unload';
    button.title = `Unload ${id} once its requests finish`;
    button.addEventListener('click', () => this.actions.unload(id));
    action.appendChild(button);
    const row = { tr, state, memory, since, countdown, button };
    this.rows.set(id, row);
    return row;
  }
}
