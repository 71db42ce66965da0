import { describe, expect, it } from 'vitest';

import {
  EMPTY_STATE,
  ModelEvent,
  ModelStatus,
  SSEParser,
  applyEvent,
  countdownText,
  formatAge,
  formatBytes,
  formatDuration,
  fromSnapshot,
  loadingText,
  nextUnload,
  stateKind,
  stateLabel,
  statusBarText
} from '../src/logic';

function status(id: string, change: Partial<ModelStatus> = {}): ModelStatus {
  return {
    id,
    state: 'ready',
    pid: 42,
    active_requests: 0,
    memory_bytes: 1536,
    loaded_at: 1000,
    last_used_at: 1000,
    keep_alive_s: 300,
    expires_at: 1300,
    ...change
  };
}

function event(type: ModelEvent['type'], model: ModelStatus, serverTime = 1000): ModelEvent {
  return { type, model, server_time: serverTime };
}

describe('formatDuration', () => {
  it('writes minutes and zero-padded seconds', () => {
    expect(formatDuration(299)).toBe('4:59');
    expect(formatDuration(5)).toBe('0:05');
    expect(formatDuration(600)).toBe('10:00');
  });
  it('adds hours from an hour on', () => {
    expect(formatDuration(3600)).toBe('1:00:00');
    expect(formatDuration(3723)).toBe('1:02:03');
  });
  it('rounds fractions up so a countdown shows 0:00 only at the end', () => {
    expect(formatDuration(0.2)).toBe('0:01');
    expect(formatDuration(0)).toBe('0:00');
    expect(formatDuration(-3)).toBe('0:00');
  });
});

describe('formatBytes and formatAge', () => {
  it('uses decimal units', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 kB');
    expect(formatBytes(385_300)).toBe('385.3 kB');
    expect(formatBytes(3e9)).toBe('3.0 GB');
    expect(formatBytes(0)).toBe('–');
  });
  it('says how long ago coarsely', () => {
    expect(formatAge(12.7)).toBe('12s');
    expect(formatAge(300)).toBe('5m');
    expect(formatAge(7380)).toBe('2h 3m');
    expect(formatAge(2 * 86400 + 3600)).toBe('2d 1h');
  });
});

describe('state mapping', () => {
  it('maps engine states to loading, busy, idle and unloading', () => {
    expect(stateLabel(status('a', { state: 'starting', expires_at: null }))).toBe('loading');
    expect(stateLabel(status('a', { active_requests: 1, expires_at: null }))).toBe('busy (1 request)');
    expect(stateLabel(status('a', { active_requests: 3, expires_at: null }))).toBe('busy (3 requests)');
    expect(stateLabel(status('a'))).toBe('idle');
    expect(stateLabel(status('a', { state: 'draining' }))).toBe('unloading');
    expect(stateLabel(status('a', { state: 'stopping' }))).toBe('unloading');
    expect(stateKind(status('a', { active_requests: 2 }))).toBe('busy');
  });
  it('counts down to expires_at only while idle', () => {
    expect(countdownText(status('a'), 1001)).toBe('unloads in 4:59');
    expect(countdownText(status('a'), 1300.5)).toBe('unloading now');
    expect(countdownText(status('a', { active_requests: 1, expires_at: null }), 1001)).toBe('');
    expect(countdownText(status('a', { keep_alive_s: -1, expires_at: null }), 1001)).toBe('kept loaded');
    expect(countdownText(status('a', { state: 'starting', expires_at: null }), 1001)).toBe('');
  });
  it('writes the elapsed time of a load in whole seconds', () => {
    expect(loadingText(7.9)).toBe('0:07 so far');
    expect(loadingText(-1)).toBe('0:00 so far');
  });
});

describe('events', () => {
  it('takes the snapshot sorted by id, with the server clock lead', () => {
    const state = fromSnapshot({ server_time: 1010, models: [status('b'), status('a')] }, 1000);
    expect(state.models.map(m => m.id)).toEqual(['a', 'b']);
    expect(state.clockOffset).toBe(10);
  });
  it('adds a model on load, replaces it on later events and removes it on unload', () => {
    let state = fromSnapshot({ server_time: 1000, models: [status('b')] }, 1000);
    state = applyEvent(state, event('load', status('a', { state: 'starting', expires_at: null })), 1000);
    expect(state.models.map(m => [m.id, stateLabel(m)])).toEqual([
      ['a', 'loading'],
      ['b', 'idle']
    ]);
    state = applyEvent(state, event('busy', status('a', { active_requests: 1, expires_at: null })), 1000);
    expect(stateLabel(state.models[0])).toBe('busy (1 request)');
    state = applyEvent(state, event('idle', status('a', { expires_at: 1500 })), 1000);
    expect(countdownText(state.models[0], 1000)).toBe('unloads in 8:20');
    state = applyEvent(state, event('unload', status('a', { state: 'stopping' })), 1000);
    expect(state.models.map(m => m.id)).toEqual(['b']);
  });
  it('corrects the countdown by the server clock of the latest event', () => {
    // The server is 30 s ahead: at local 1000 it is 1030 there, so 270 s remain.
    const state = applyEvent(EMPTY_STATE, event('ready', status('a'), 1030), 1000);
    expect(nextUnload(state, 1000)).toBe(270);
    expect(statusBarText(state, 1000)).toBe('MLX: 1 idle · next unload 4:30');
  });
});

describe('statusBarText', () => {
  it('names the count and the nearest unload', () => {
    const state = fromSnapshot(
      { server_time: 1000, models: [status('a', { expires_at: 1252 }), status('b', { expires_at: 1400 })] },
      1000
    );
    expect(statusBarText(state, 1000)).toBe('MLX: 2 idle · next unload 4:12');
  });
  it('counts the models by state, busy first', () => {
    const models = [
      status('a', { expires_at: 1252 }),
      status('b', { active_requests: 1, expires_at: null }),
      status('c', { state: 'starting', expires_at: null }),
      status('d', { active_requests: 2, expires_at: null })
    ];
    const state = fromSnapshot({ server_time: 1000, models }, 1000);
    expect(statusBarText(state, 1000)).toBe('MLX: 2 busy, 1 loading, 1 idle · next unload 4:12');
  });
  it('leaves out the unload when every model is busy or kept', () => {
    const state = fromSnapshot({ server_time: 1000, models: [status('a', { active_requests: 1, expires_at: null })] }, 1000);
    expect(statusBarText(state, 1000)).toBe('MLX: 1 busy');
    expect(statusBarText(EMPTY_STATE, 1000)).toBe('MLX: no model loaded');
  });
  it('says when the server does not answer, whatever it last said', () => {
    const state = fromSnapshot({ server_time: 1000, models: [status('a')] }, 1000);
    expect(statusBarText(state, 1000, false)).toBe('MLX: server unreachable');
    expect(statusBarText(EMPTY_STATE, 1000, false)).toBe('MLX: server unreachable');
  });
});

describe('SSEParser', () => {
  it('parses events cut at any point, skipping pings', () => {
    const stream = 'event: snapshot\ndata: {"a": 1}\n\n: ping\n\nevent: load\ndata: {"b": 2}\n\n';
    for (let cut = 0; cut <= stream.length; cut++) {
      const parser = new SSEParser();
      const got = [...parser.feed(stream.slice(0, cut)), ...parser.feed(stream.slice(cut))];
      expect(got).toEqual([
        { event: 'snapshot', data: '{"a": 1}' },
        { event: 'load', data: '{"b": 2}' }
      ]);
    }
  });
  it('joins multi-line data and defaults the event name', () => {
    expect(new SSEParser().feed('data: one\ndata: two\r\n\r\n')).toEqual([{ event: 'message', data: 'one\ntwo' }]);
  });
});
