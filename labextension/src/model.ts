/**
 * The live list of loaded models: `mlx/api/events` when it works, polling
 * `mlx/api/models` with back-off when it does not.
 */

import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import * as api from './api';
import { EMPTY_STATE, ModelsState, applyEvent, fromSnapshot } from './logic';
import { DashboardData } from './table';

/** Stream attempts that fail before their first snapshot, after which only polling is used. */
const MAX_STREAM_FAILURES = 3;
const UNREACHABLE = 'MLX server unreachable';

function localNow(): number {
  return Date.now() / 1000;
}

/**
 * Owns the models state the panel and the status bar show.
 *
 * One Poll drives everything: while the event stream is up, its ticks do nothing; when
 * the stream is down, a tick fetches `mlx/api/models` (a failure makes the Poll back off)
 * and then tries the stream again. A server that never keeps a stream up (a proxy that
 * buffers it) leaves the model polling.
 */
export class ModelsModel {
  private _data: DashboardData = { state: EMPTY_STATE, available: [], error: '', pending: {}, reachable: true };
  private readonly _changed = new Signal<this, void>(this);
  private readonly _ticked = new Signal<this, void>(this);
  private readonly _clock: number;
  private readonly _poll: Poll;
  private readonly _abort = new AbortController();
  private _streaming = false; // a stream request is open (or being opened)
  private _live = false; // ... and it has delivered its snapshot
  private _streamFailures = 0;
  private _availableLoaded = false;

  constructor() {
    this._poll = new Poll({
      factory: () => this._tick(),
      frequency: { interval: 3000, backoff: true, max: 60000 },
      name: 'mlx-jupyter:models',
      standby: 'when-hidden'
    });
    // One clock for every view, so the panel and the status bar show the same second.
    this._clock = window.setInterval(() => this._ticked.emit(), 1000);
  }

  /** Emitted when the data changes (not on clock ticks). */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Emitted every second: countdowns move. */
  get ticked(): ISignal<this, void> {
    return this._ticked;
  }

  get data(): DashboardData {
    return this._data;
  }

  get state(): ModelsState {
    return this._data.state;
  }

  /** False from a failed poll until the server answers again. */
  get reachable(): boolean {
    return this._data.reachable;
  }

  /** `events` while the event stream delivers, else `polling`. */
  get mode(): 'events' | 'polling' {
    return this._live ? 'events' : 'polling';
  }

  async load(modelId: string): Promise<void> {
    await this._act(modelId, 'load', () => api.loadModel(modelId));
  }

  async unload(modelId: string): Promise<void> {
    await this._act(modelId, 'unload', () => api.unloadModel(modelId));
  }

  /** Fetch the loadable models again (they change when model_dirs or the HF cache do). */
  async refreshAvailable(): Promise<void> {
    try {
      this._set({ available: await api.getAvailable() });
      this._availableLoaded = true;
    } catch (reason) {
      this._set({ error: `could not list models: ${message(reason)}` });
    }
  }

  dispose(): void {
    window.clearInterval(this._clock);
    this._abort.abort();
    this._poll.dispose();
  }

  private async _act(modelId: string, action: 'load' | 'unload', call: () => Promise<unknown>): Promise<void> {
    this._set({ pending: { ...this._data.pending, [modelId]: action }, error: '' });
    try {
      await call();
    } catch (reason) {
      this._set({ error: `${action} ${modelId}: ${message(reason)}` });
    } finally {
      const pending = { ...this._data.pending };
      delete pending[modelId];
      this._set({ pending });
    }
    if (!this._live) {
      // Without events, show the outcome now (a failure is already shown as the error line).
      await this._refreshModels().catch(() => undefined);
    }
  }

  private async _tick(): Promise<void> {
    if (!this._availableLoaded) {
      await this.refreshAvailable();
    }
    if (this._streaming) {
      return;
    }
    await this._refreshModels();
    if (this._streamFailures < MAX_STREAM_FAILURES) {
      void this._stream();
    }
  }

  private async _refreshModels(): Promise<void> {
    try {
      const snapshot = await api.getModels();
      // The server answers again: drop its unreachable line, keep a failed action's.
      const error = this._data.error.startsWith(UNREACHABLE) ? '' : this._data.error;
      this._set({ state: fromSnapshot(snapshot, localNow()), error, reachable: true });
    } catch (reason) {
      // What it last said may no longer be true: show nothing rather than stale models.
      this._set({ state: EMPTY_STATE, error: `${UNREACHABLE}: ${message(reason)}`, reachable: false });
      throw reason; // the Poll backs off
    }
  }

  private async _stream(): Promise<void> {
    this._streaming = true;
    let gotSnapshot = false;
    try {
      await api.followEvents(
        {
          snapshot: snapshot => {
            gotSnapshot = true;
            this._live = true;
            this._streamFailures = 0;
            this._set({ state: fromSnapshot(snapshot, localNow()), reachable: true });
          },
          event: event => this._set({ state: applyEvent(this._data.state, event, localNow()) })
        },
        this._abort.signal
      );
    } catch (reason) {
      if (this._abort.signal.aborted) {
        return;
      }
      console.warn('mlx-jupyter: model events stream failed, polling instead', reason);
    } finally {
      this._streaming = false;
      this._live = false;
    }
    if (!gotSnapshot) {
      this._streamFailures += 1;
    }
    if (!this._poll.isDisposed) {
      void this._poll.refresh(); // fall back to a poll at once
    }
  }

  private _set(change: Partial<DashboardData>): void {
    this._data = { ...this._data, ...change };
    this._changed.emit();
  }
}

function message(reason: unknown): string {
  return reason instanceof Error ? reason.message : String(reason);
}
