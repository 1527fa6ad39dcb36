"""Rich results of a Python run, Jupyter-style: the guest side and the host's check.

The guest side (``PY_RICH_BOOT``, run once in every Python interpreter)
collects MIME bundles while a run goes: the value of the last bare expression
(through ``sys.displayhook``, which the interpreter's ``turn`` calls, and
which still prints its repr as before), every ``display(obj)``, and every
matplotlib figure shown (``plt.show()``) or still open at the end of the run
(drawn to PNG with Agg, then closed). ``IPython`` / ``IPython.display`` are
small stand-ins with the names published notebooks import.

The channel (T-DOS-1, T-PROTO-1): after the run, the host itself runs one
more turn, ``PY_COLLECT``, whose only output is the pending bundles as one
ASCII JSON list, captured with its own byte cap and deadline, apart from the
run's stdout. Nothing is read from a path the guest could name. The guest
may of course forge or garble its bundles (they are its own output, like
stdout); ``check_results`` keeps what is well formed, within the caps, and
never lets them decide anything on the host.
"""
from __future__ import annotations

import json
from typing import Any

from appliance.runtime.protocol import MAX_RESULTS, RESULT_MIMES, ResultBundle

# The guest side. Caps arrive with each collection turn: the guest replaces a
# result over them by a short note itself, so one huge chart does not push the
# rest past the host's cap (the host checks again anyway).
PY_RICH_BOOT = r"""
def _cell_rich():
    import sys, os, builtins, types
    pending = []
    REPRS = (('text/html', '_repr_html_'), ('text/markdown', '_repr_markdown_'), ('text/latex', '_repr_latex_'),
             ('image/svg+xml', '_repr_svg_'), ('image/png', '_repr_png_'), ('image/jpeg', '_repr_jpeg_'),
             ('application/json', '_repr_json_'))
    write = os.write
    state = {'main': False}

    def b64(data):
        import base64
        return base64.b64encode(bytes(data)).decode('ascii')

    def to_json(value):
        import json
        return json.dumps(value, default=str, allow_nan=False) if not isinstance(value, str) else value

    def add(bundle, main):
        bundle['is_main_result'] = bool(main)
        if len(pending) < 64:
            pending.append(bundle)
        else:
            state['truncated'] = True

    def figure_bundle(fig):
        import io
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format='png')
        except (MemoryError, ValueError, OverflowError) as e:
            state['truncated'] = True
            return {'text/plain': 'Cell: this figure could not be drawn: %s: %s' % (type(e).__name__, str(e)[:200])}
        w, h = fig.get_size_inches() * fig.dpi
        return {'text/plain': '<Figure size %dx%d with %d Axes>' % (round(w), round(h), len(fig.axes)),
                'image/png': b64(buf.getbuffer())}

    def bundle_of(obj):
        mod = type(obj).__module__ or ''
        if mod.startswith('matplotlib.figure') and hasattr(obj, 'savefig'):
            out = figure_bundle(obj)
            plt = sys.modules.get('matplotlib.pyplot')
            if plt is not None:
                plt.close(obj)  # shown once: not again among the figures open at the end
            return out
        out = {}
        try:
            out['text/plain'] = repr(obj)
        except Exception as e:
            out['text/plain'] = '<%s object (repr failed: %s)>' % (type(obj).__name__, type(e).__name__)
        if isinstance(obj, type):
            return out
        for mime, name in REPRS:
            try:
                method = getattr(obj, name, None)
                value = method() if callable(method) else None
                if isinstance(value, tuple) and value:
                    value = value[0]  # (data, metadata)
                if value is None:
                    continue
                if mime in ('image/png', 'image/jpeg'):
                    value = b64(value) if isinstance(value, (bytes, bytearray, memoryview)) else str(value)
                elif mime == 'application/json':
                    value = to_json(value)
                elif not isinstance(value, str):
                    continue
                out[mime] = value
            except Exception:
                continue
        if mod.startswith('pandas') and type(obj).__name__ == 'DataFrame' and 'application/json' not in out \
                and getattr(obj, 'size', 0) <= 1_000_000:
            try:  # its records, as the E2B SDK's Result.data expects
                out['application/json'] = obj.to_json(orient='records', date_format='iso', default_handler=str)
            except Exception:
                pass
        return out

    def display(*objs, **kwargs):
        for obj in objs:
            if kwargs.get('raw') and isinstance(obj, dict):
                add({k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str)}, False)
            else:
                add(bundle_of(obj), False)

    def flush_figures():
        plt = sys.modules.get('matplotlib.pyplot')
        if plt is None:
            return
        from matplotlib._pylab_helpers import Gcf
        for manager in list(Gcf.get_all_fig_managers()):
            fig = manager.canvas.figure
            try:
                add(figure_bundle(fig), False)
            finally:
                plt.close(fig)

    default_hook = sys.displayhook

    def displayhook(value):
        if value is None:
            return
        try:
            add(bundle_of(value), True)
        except Exception:
            pass
        default_hook(value)

    def collect(per_cap, total_cap):
        # Sizes are those of the ASCII JSON the host reads: a result over its
        # cap, or past the total, becomes a short note (the host checks again).
        plt = sys.modules.get('matplotlib.pyplot')
        if not pending and not state.get('truncated') and (plt is None or not plt.get_fignums()):
            write(1, b'{"results":[]}')  # the common case, kept cheap
            return
        import json
        try:
            flush_figures()
        except Exception as e:
            add({'text/plain': 'Cell: the open figures could not be drawn: %s' % type(e).__name__}, False)
        def json_size(bundle):
            # A base64 image needs no escapes: its length, not a copy of it.
            return sum(len(k) + 6 + (len(v) if k.startswith('image/') and k != 'image/svg+xml' and v.isalnum()
                                     else len(json.dumps(v, ensure_ascii=True)))
                       for k, v in bundle.items() if isinstance(v, str)) + 32

        items, total = [], 0
        for bundle in pending:
            size = first = json_size(bundle)
            dropped = []
            while (size > per_cap or total + size > total_cap) and len(bundle) > 2:
                # Keep what fits: the biggest format goes first, text/plain last.
                big = max((k for k in bundle if k not in ('text/plain', 'is_main_result')), key=lambda k: len(bundle[k]))
                dropped.append(big)
                bundle = {k: v for k, v in bundle.items() if k != big}
                size = json_size(bundle)
            if dropped and size <= per_cap and total + size <= total_cap:
                state['truncated'] = True
                bundle['text/plain'] = bundle.get('text/plain', '') + (
                    '\n[Cell: result trimmed: its %s left out, the result took %d bytes, over the cap of %d bytes %s]'
                    % (', '.join(dropped), first, per_cap if first > per_cap else total_cap - total,
                       'per result' if first > per_cap else 'left for this run'))
                size = json_size(bundle)
            if size > per_cap or total + size > total_cap:
                kinds = ', '.join(sorted(dropped) or sorted(k for k in bundle if k not in ('text/plain', 'is_main_result')))
                bundle = {'text/plain': 'Cell: result omitted: its %s takes %d bytes, over the cap of %d bytes %s'
                                        % (kinds or 'text', size, per_cap if size > per_cap else total_cap - total,
                                           'per result' if size > per_cap else 'left for this run'),
                          'is_main_result': bundle.get('is_main_result', False)}
                state['truncated'] = True
                size = json_size(bundle)
            items.append(bundle)
            total += size
        pending.clear()
        payload = json.dumps({'results': items, 'truncated': bool(state.pop('truncated', False))},
                             ensure_ascii=True).encode('ascii')
        while payload:
            n = write(1, payload)
            payload = payload[n:]

    def patch_pyplot(module):
        def show(*args, **kwargs):
            flush_figures()
        module.show = show

    class Finder:
        # Wraps matplotlib.pyplot's loader so that its show() adds the open figures as results.
        def find_spec(self, name, path=None, target=None):
            if name != 'matplotlib.pyplot':
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, 'find_spec'):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = Loader(spec.loader)
                    return spec
            return None

    class Loader:
        def __init__(self, inner):
            self.inner = inner

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            self.inner.exec_module(module)
            patch_pyplot(module)

    sys.meta_path.insert(0, Finder())
    if 'matplotlib.pyplot' in sys.modules:
        patch_pyplot(sys.modules['matplotlib.pyplot'])
    sys.displayhook = displayhook

    class _Shown:
        def __init__(self, data=None, url=None, filename=None, **kwargs):
            if data is None and filename is not None:
                with open(filename, 'rb' if self._binary else 'r') as f:
                    data = f.read()
            self.data, self.url, self.filename = data, url, filename
            self.metadata = kwargs

        _binary = False

        def __repr__(self):
            return '<IPython.core.display.%s object>' % type(self).__name__

    class HTML(_Shown):
        def _repr_html_(self):
            return None if self.data is None else str(self.data)

    class Markdown(_Shown):
        def _repr_markdown_(self):
            return None if self.data is None else str(self.data)

    class Latex(_Shown):
        def _repr_latex_(self):
            return None if self.data is None else str(self.data)

    class SVG(_Shown):
        def _repr_svg_(self):
            data = self.data
            return data.decode('utf-8', 'replace') if isinstance(data, bytes) else data

    class JSON(_Shown):
        def __init__(self, data=None, url=None, filename=None, **kwargs):
            import json
            super().__init__(data, url, filename, **kwargs)
            if isinstance(self.data, str):
                self.data = json.loads(self.data)

        def _repr_json_(self):
            return self.data

    class Image(_Shown):
        _binary = True

        def __init__(self, data=None, url=None, filename=None, format=None, **kwargs):
            if isinstance(data, str) and filename is None and url is None and not data.startswith(('http:', 'https:')):
                data, filename = None, data
            super().__init__(data, url, filename, **kwargs)
            kind = (format or '').lower()
            if not kind and isinstance(self.data, (bytes, bytearray)):
                kind = 'jpeg' if bytes(self.data[:3]) == b'\xff\xd8\xff' else 'png'
            self.format = 'jpeg' if kind in ('jpg', 'jpeg') else kind

        def _repr_png_(self):
            return self.data if self.format == 'png' else None

        def _repr_jpeg_(self):
            return self.data if self.format == 'jpeg' else None

    def clear_output(wait=False):
        pass

    ipython = types.ModuleType('IPython')
    shown = types.ModuleType('IPython.display')
    core = types.ModuleType('IPython.core')
    core_display = types.ModuleType('IPython.core.display')
    names = dict(display=display, HTML=HTML, Markdown=Markdown, Latex=Latex, JSON=JSON, Image=Image, SVG=SVG,
                 clear_output=clear_output)
    for mod in (shown, core_display):
        mod.__dict__.update(names)
    ipython.display, ipython.core, core.display = shown, core, core_display
    # Not a running IPython: libraries that look (matplotlib, pandas, tqdm) see no shell.
    ipython.__dict__.update(get_ipython=lambda: None, version_info=(0, 0, 0, 'cell'), __version__='0.0.0+cell')
    sys.modules.update({'IPython': ipython, 'IPython.display': shown, 'IPython.core': core,
                        'IPython.core.display': core_display})
    builtins.display = display
    cell = types.ModuleType('_cell_results')
    cell.collect = collect
    sys.modules['_cell_results'] = cell
_cell_rich()
del _cell_rich
"""



def collect_code(per_cap: int, total_cap: int) -> bytes:
    """The host's own turn after each run: the bundles, and nothing else, on fd 1."""
    return f"__import__('_cell_results').collect({int(per_cap)}, {int(total_cap)})\n".encode()


def collect_cap(total_cap: int) -> int:
    """The byte cap of the collection turn's capture: the guest keeps within
    ``total_cap`` plus the notes that replace results over it."""
    return total_cap + 1024 * (MAX_RESULTS + 1)


def check_results(raw: str, per_cap: int, total_cap: int, cut: bool) -> tuple[list[ResultBundle], bool]:
    """The bundles a collection turn printed, kept only where well formed and
    within the caps (T-DOS-1); the second value says something was left out.
    ``cut``: the capture hit its cap, so the text is incomplete."""
    if cut:
        return [], True
    try:
        doc: Any = json.loads(raw) if raw else {"results": []}
    except (ValueError, RecursionError):
        return [], True
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        return [], True
    truncated = doc.get("truncated") is True
    out: list[ResultBundle] = []
    total = 0
    for item in doc["results"]:
        if len(out) >= MAX_RESULTS:
            truncated = True
            break
        if not isinstance(item, dict):
            truncated = True
            continue
        main = item.pop("is_main_result", False)
        data = {k: v for k, v in item.items() if k in RESULT_MIMES and isinstance(v, str)}
        if not isinstance(main, bool) or len(data) != len(item) or not data:
            truncated = True  # an unknown key or a value that is not text: not a result
            continue
        size = sum(len(v) for v in data.values())
        if size > per_cap or total + size > total_cap:
            out.append(ResultBundle({"text/plain": f"Cell: result omitted, {size} bytes over the cap of "
                                                   f"{min(per_cap, total_cap - total)} bytes"}, main))
            truncated = True
            continue
        total += size
        out.append(ResultBundle(data, main))
    return out, truncated
