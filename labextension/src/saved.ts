/**
 * Saved dashboards: a notebook reopened with a new kernel shows the dashboard's static
 * snapshot instead of "Error displaying widget: model not found".
 */

import { IRenderMime, IRenderMimeRegistry } from '@jupyterlab/rendermime';

const WIDGET_VIEW = 'application/vnd.jupyter.widget-view+json';
const MODEL_NOT_FOUND = 'Error displaying widget: model not found';
/** The class of the snapshot the dashboard saves beside its widget view (mlx_jupyter/kernel/widgets.py). */
const SNAPSHOT_CLASS = 'mlx-dashboard-snapshot';

/**
 * Makes the widget renderer fall back to the output's own HTML snapshot when the widget's
 * model is gone (the kernel that made it has stopped), for the dashboard's outputs only.
 *
 * Why here: ipywidgets' renderer shows its error and never uses the output's other formats
 * (jupyter-widgets/ipywidgets#3773). The factory is wrapped, not replaced: the renderer
 * stays ipywidgets' own object (its manager finds it by class), with its renderModel
 * wrapped. Notebooks copy the registry's factories when they open, so wrapping the shared
 * factory before any notebook opens covers all of them.
 */
export function fallBackToSnapshots(rendermime: IRenderMimeRegistry): void {
  const factory = rendermime.getFactory(WIDGET_VIEW);
  if (!factory) {
    return; // no widget support installed: the snapshot is the output's best format already
  }
  const rank = rendermime.getRank(WIDGET_VIEW) ?? 0;
  rendermime.addFactory(
    {
      ...factory,
      createRenderer: options => withSnapshotFallback(factory.createRenderer(options), rendermime)
    },
    rank
  );
}

function withSnapshotFallback(renderer: IRenderMime.IRenderer, rendermime: IRenderMimeRegistry): IRenderMime.IRenderer {
  const renderModel = renderer.renderModel.bind(renderer);
  renderer.renderModel = async (model: IRenderMime.IMimeModel) => {
    await renderModel(model);
    const html = model.data['text/html'];
    if (renderer.node.textContent !== MODEL_NOT_FOUND || typeof html !== 'string' || !html.includes(SNAPSHOT_CLASS)) {
      return;
    }
    const snapshot = rendermime.createRenderer('text/html');
    await snapshot.renderModel(model);
    const note = document.createElement('div');
    note.className = 'mlx-snapshot-note';
    note.textContent = 'Saved snapshot: run the cell again for the live dashboard.';
    renderer.node.replaceChildren(note, snapshot.node);
    renderer.removeClass('jupyter-widgets');
  };
  return renderer;
}
