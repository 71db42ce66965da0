import { readFileSync } from 'fs';
import { join } from 'path';
import { describe, expect, it } from 'vitest';

import { ModelStatus, countdownText, stateLabel } from '../src/logic';

// The cases tests/test_labels.py checks against `%mlx list` (mlx_jupyter/kernel/labels.py).
interface Case {
  status: Pick<ModelStatus, 'state' | 'active_requests' | 'expires_at'>;
  now: number;
  state: string;
  countdown: string;
}
const { cases } = JSON.parse(readFileSync(join(__dirname, '..', '..', 'tests', 'labels.json'), 'utf8')) as {
  cases: Case[];
};

function full(status: Case['status']): ModelStatus {
  return { id: 'm', pid: 1, memory_bytes: 1, loaded_at: 900, last_used_at: 990, keep_alive_s: 300, ...status };
}

describe('the words shared with %mlx list', () => {
  it('has cases to check', () => {
    expect(cases.length).toBeGreaterThan(5);
  });
  for (const c of cases) {
    it(`says "${c.state}" and "${c.countdown}" for ${JSON.stringify(c.status)} at ${c.now}`, () => {
      expect(stateLabel(full(c.status))).toBe(c.state);
      expect(countdownText(full(c.status), c.now)).toBe(c.countdown);
    });
  }
});
