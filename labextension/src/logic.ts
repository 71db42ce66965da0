/**
 * The dashboard's pure logic: model events, clock correction, countdowns and labels.
 *
 * No JupyterLab imports here: the notebook widget bundles this module too, and the unit
 * tests run it under plain Node.
 */

/** One resident model, as in `GET mlx/api/models` (times are epoch seconds). */
export interface ModelStatus {
  id: string;
  state: string;
  pid: number | null;
  active_requests: number;
  memory_bytes: number;
  loaded_at: number | null;
  last_used_at: number | null;
  keep_alive_s: number;
  expires_at: number | null;
}

/** `GET mlx/api/models`, and the `snapshot` event of `mlx/api/events`. */
export interface ModelsSnapshot {
  server_time: number;
  models: ModelStatus[];
}

/** Every later event of `mlx/api/events`. */
export interface ModelEvent {
  type: 'load' | 'ready' | 'busy' | 'idle' | 'unloading' | 'unload';
  model: ModelStatus;
  server_time: number;
}

/** A loadable model, as in `GET mlx/api/models/available`. */
export interface AvailableModel {
  id: string;
  source: string;
  path: string;
  size_bytes: number;
}

/**
 * What the views show: the models by id order, and the server clock's lead over the
 * local one (seconds), so countdowns tick locally from the server's absolute deadlines.
 */
export interface ModelsState {
  models: ModelStatus[];
  clockOffset: number;
}

export const EMPTY_STATE: ModelsState = { models: [], clockOffset: 0 };

/** The state a snapshot describes; `localNow` is when it arrived (epoch seconds). */
export function fromSnapshot(snapshot: ModelsSnapshot, localNow: number): ModelsState {
  const models = [...snapshot.models].sort((a, b) => a.id.localeCompare(b.id));
  return { models, clockOffset: snapshot.server_time - localNow };
}

/** The state after one event: `unload` removes the model, any other event replaces it. */
export function applyEvent(state: ModelsState, event: ModelEvent, localNow: number): ModelsState {
  const others = state.models.filter(m => m.id !== event.model.id);
  const models = event.type === 'unload' ? others : [...others, event.model];
  models.sort((a, b) => a.id.localeCompare(b.id));
  const clockOffset = typeof event.server_time === 'number' ? event.server_time - localNow : state.clockOffset;
  return { models, clockOffset };
}

/** The server's clock now, from the local one. */
export function serverNow(state: ModelsState, localNow: number): number {
  return localNow + state.clockOffset;
}

/** Seconds as `m:ss`, or `h:mm:ss` from an hour; negative counts as zero. */
export function formatDuration(seconds: number): string {
  const total = Math.max(0, Math.ceil(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const ss = String(s).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/** Bytes in decimal units with one decimal (`385.3 kB`), as `%mlx list` counts them. */
export function formatBytes(bytes: number): string {
  if (!bytes || bytes < 0) {
    return '–';
  }
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

/** How long ago, coarsely: `12s`, `5m`, `2h 3m`, `3d 4h`. */
export function formatAge(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  }
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

/*
 * The words for a model's state and idle countdown. `%mlx list` and the notebook
 * snapshot say the same in Python (mlx_jupyter/kernel/labels.py); tests/labels.json holds
 * the cases both must meet.
 */

/** The state: `loading`, `busy (N requests)`, `idle` or `unloading`. */
export function stateLabel(model: ModelStatus): string {
  switch (stateKind(model)) {
    case 'busy': {
      const n = model.active_requests;
      return `busy (${n} request${n === 1 ? '' : 's'})`;
    }
    default:
      return stateKind(model);
  }
}

/** A CSS-friendly kind for the state. */
export function stateKind(model: ModelStatus): 'loading' | 'busy' | 'idle' | 'unloading' {
  if (model.state === 'starting') {
    return 'loading';
  }
  if (model.state !== 'ready') {
    return 'unloading'; // draining, stopping
  }
  return model.active_requests > 0 ? 'busy' : 'idle';
}

/** Seconds until the idle unload, or null when none is due (busy, loading, kept loaded). */
export function secondsLeft(model: ModelStatus, now: number): number | null {
  if (model.state !== 'ready' || model.active_requests > 0 || model.expires_at === null) {
    return null;
  }
  return model.expires_at - now;
}

/**
 * The idle countdown of an idle model: `unloads in 4:59`, `unloading now` or
 * `kept loaded`; empty in every other state, which the state already names.
 */
export function countdownText(model: ModelStatus, now: number): string {
  if (stateKind(model) !== 'idle') {
    return '';
  }
  const left = secondsLeft(model, now);
  if (left === null) {
    return 'kept loaded';
  }
  return left > 0 ? `unloads in ${formatDuration(left)}` : 'unloading now';
}

/** How long a load has taken so far: `0:07 so far`. */
export function loadingText(elapsed: number): string {
  return `${formatDuration(Math.max(0, Math.floor(elapsed)))} so far`;
}

/** Seconds until the first idle unload among the models, or null when none is due. */
export function nextUnload(state: ModelsState, localNow: number): number | null {
  const now = serverNow(state, localNow);
  const lefts = state.models.map(m => secondsLeft(m, now)).filter((s): s is number => s !== null);
  return lefts.length ? Math.min(...lefts) : null;
}

const KIND_ORDER = ['busy', 'loading', 'idle', 'unloading'] as const;

/**
 * The status bar's text: `MLX: 1 busy, 1 idle · next unload 4:12`, `MLX: no model
 * loaded`, or `MLX: server unreachable` when the server does not answer.
 */
export function statusBarText(state: ModelsState, localNow: number, reachable = true): string {
  if (!reachable) {
    return 'MLX: server unreachable';
  }
  if (state.models.length === 0) {
    return 'MLX: no model loaded';
  }
  const counts = KIND_ORDER.map(kind => [kind, state.models.filter(m => stateKind(m) === kind).length] as const);
  const head = `MLX: ${counts
    .filter(([, n]) => n > 0)
    .map(([kind, n]) => `${n} ${kind}`)
    .join(', ')}`;
  const next = nextUnload(state, localNow);
  return next === null ? head : `${head} · next unload ${formatDuration(next)}`;
}

/** One parsed Server-Sent Event. */
export interface SSEMessage {
  event: string;
  data: string;
}

/**
 * Splits a Server-Sent Events byte stream (already decoded to text) into messages.
 * Chunks may cut lines and messages anywhere; comments (`: ping`) are dropped.
 */
export class SSEParser {
  private buffer = '';
  private event = '';
  private data: string[] = [];

  feed(chunk: string): SSEMessage[] {
    this.buffer += chunk;
    const out: SSEMessage[] = [];
    let newline: number;
    while ((newline = this.buffer.search(/\r\n|\n|\r/)) >= 0) {
      const line = this.buffer.slice(0, newline);
      const eol = this.buffer.startsWith('\r\n', newline) ? 2 : 1;
      this.buffer = this.buffer.slice(newline + eol);
      if (line === '') {
        if (this.data.length) {
          out.push({ event: this.event || 'message', data: this.data.join('\n') });
        }
        this.event = '';
        this.data = [];
        continue;
      }
      if (line.startsWith(':')) {
        continue;
      }
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) {
        value = value.slice(1);
      }
      if (field === 'event') {
        this.event = value;
      } else if (field === 'data') {
        this.data.push(value);
      }
    }
    return out;
  }
}
