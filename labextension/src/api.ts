/**
 * Calls to the server's `mlx/api/...` routes through JupyterLab's ServerConnection, so
 * the token, cookies and XSRF header are those of every other JupyterLab request.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { AvailableModel, ModelEvent, ModelStatus, ModelsSnapshot, SSEParser } from './logic';

const settings = ServerConnection.makeSettings();

function apiUrl(path: string): string {
  return URLExt.join(settings.baseUrl, 'mlx/api', path);
}

/** The server's one-line error message (`{"error": {"message"}}`), or the HTTP status. */
async function failure(response: Response): Promise<ServerConnection.ResponseError> {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body?.error?.message ?? message;
  } catch {
    // not JSON: keep the status line
  }
  return new ServerConnection.ResponseError(response, message);
}

async function requestJSON<T>(path: string, init: RequestInit = {}): Promise<T> {
  const response = await ServerConnection.makeRequest(apiUrl(path), init, settings);
  if (!response.ok) {
    throw await failure(response);
  }
  return (await response.json()) as T;
}

export function getModels(): Promise<ModelsSnapshot> {
  return requestJSON<ModelsSnapshot>('models');
}

export function getAvailable(): Promise<AvailableModel[]> {
  return requestJSON<AvailableModel[]>('models/available');
}

export function loadModel(model: string): Promise<ModelStatus> {
  return requestJSON<ModelStatus>('models/load', { method: 'POST', body: JSON.stringify({ model }) });
}

export function unloadModel(model: string): Promise<ModelStatus> {
  return requestJSON<ModelStatus>('models/unload', { method: 'POST', body: JSON.stringify({ model }) });
}

/** Handlers for the two kinds of message on `mlx/api/events`. */
export interface EventHandlers {
  snapshot(snapshot: ModelsSnapshot): void;
  event(event: ModelEvent): void;
}

/**
 * Follows `mlx/api/events` until the server ends the stream (resolves) or the connection
 * fails or `signal` aborts (rejects).
 *
 * Why fetch and not EventSource: EventSource cannot send headers, so under token auth it
 * would need the token in the URL (where it leaks into logs and history), and it hides
 * HTTP errors. ServerConnection's fetch sends the same credentials as every other call,
 * and the response body's reader delivers each event as soon as it is flushed.
 */
export async function followEvents(handlers: EventHandlers, signal: AbortSignal): Promise<void> {
  const init: RequestInit = { headers: { Accept: 'text/event-stream' }, signal };
  const response = await ServerConnection.makeRequest(apiUrl('events'), init, settings);
  if (!response.ok || !response.body) {
    throw await failure(response);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      return;
    }
    for (const message of parser.feed(value)) {
      const data = JSON.parse(message.data);
      if (message.event === 'snapshot') {
        handlers.snapshot(data as ModelsSnapshot);
      } else {
        handlers.event(data as ModelEvent);
      }
    }
  }
}
