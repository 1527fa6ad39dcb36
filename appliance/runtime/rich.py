"""Rich results of a Python run, Jupyter-style: the guest side.

The guest side (``PY_RICH_BOOT``, run once in every Python interpreter)
hands the host one MIME bundle the moment it is shown: the value of the last
bare expression (through ``sys.displayhook``, which the interpreter's
``turn`` calls, and which still prints its repr as before), every
``display(obj)``, and every matplotlib figure shown (``plt.show()``). Each
goes through the host's results channel (``_host.call``, served by
results_channel.py), which checks it against the run's caps before reading it
(T-DOS-1) and streams it to the client at once. ``IPython`` /
``IPython.display`` are small stand-ins with the names published notebooks
import.

Figures still open at the end of a run are drawn by one more turn the host
runs itself (``collect_code``), only in interpreters that have loaded pyplot:
a run that never drew anything pays no extra turn.
"""
from __future__ import annotations

# The guest side. Over a cap, the host answers with the caps, and the guest
# leaves out the biggest formats itself (a chart keeps its text/plain), so one
# huge chart does not push the rest past the run's cap.
PY_RICH_BOOT = r"""
def _cell_rich():
    import sys, builtins, types
    REPRS = (('text/html', '_repr_html_'), ('text/markdown', '_repr_markdown_'), ('text/latex', '_repr_latex_'),
             ('image/svg+xml', '_repr_svg_'), ('image/png', '_repr_png_'), ('image/jpeg', '_repr_jpeg_'),
             ('application/json', '_repr_json_'))
    try:
        from _host import call as door
    except ImportError:
        door = None
    RESULT, FIGURES = b'cell-result/1\n', b'cell-figures/1\n'

    def b64(data):
        import base64
        return base64.b64encode(bytes(data)).decode('ascii')

    def to_json(value):
        import json
        return json.dumps(value, default=str, allow_nan=False) if not isinstance(value, str) else value

    def send(frame):
        # The host's answer: b'' kept, b'over <cap> <room>', b'full' or b'bad'.
        if door is None:
            return b'bad'
        try:
            return door(frame)
        except OSError:  # no run in progress (no host bound), or a fault
            return b'bad'

    def add(bundle, main):
        # Sent at once. The host checks the size before it reads the bundle and,
        # over a cap, answers with the caps: keep what fits, text/plain last.
        import json
        bundle['is_main_result'] = bool(main)
        first, dropped, plain, last = None, [], bundle.get('text/plain', ''), False
        while True:
            data = json.dumps(bundle, ensure_ascii=True).encode('ascii')
            if first is None:
                first = len(data)
            answer = send(RESULT + data)
            if last or not answer.startswith(b'over '):
                return
            _, per_cap, room = answer.split()
            cap, where = (int(per_cap), 'per result') if first > int(per_cap) else (int(room), 'left for this run')
            rest = [k for k in bundle if k not in ('text/plain', 'is_main_result', 'trimmed')]
            if rest:  # the biggest format goes first
                big = max(rest, key=lambda k: len(bundle[k]))
                dropped.append(big)
                bundle = {k: v for k, v in bundle.items() if k != big}
                bundle['text/plain'] = plain + (
                    '\n[Cell: result trimmed: its %s left out, the result took %d bytes, over the cap of %d bytes %s]'
                    % (', '.join(dropped), first, cap, where))
            else:
                last = True
                bundle = {'text/plain': 'Cell: result omitted: its %s takes %d bytes, over the cap of %d bytes %s'
                                        % (', '.join(sorted(dropped)) or 'text', first, cap, where),
                          'is_main_result': bundle['is_main_result']}
            bundle['trimmed'] = True

    def figure_bundle(fig):
        import io
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format='png')
        except (MemoryError, ValueError, OverflowError) as e:
            return {'text/plain': 'Cell: this figure could not be drawn: %s: %s' % (type(e).__name__, str(e)[:200]),
                    'trimmed': True}
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

    def collect():
        # The host's own turn after a run, once pyplot is loaded: figures still open.
        try:
            flush_figures()
        except Exception as e:
            add({'text/plain': 'Cell: the open figures could not be drawn: %s' % type(e).__name__, 'trimmed': True},
                False)

    def patch_pyplot(module):
        def show(*args, **kwargs):
            flush_figures()
        module.show = show
        send(FIGURES)  # from now on, figures may be left open at the end of a run

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



def collect_code() -> bytes:
    """The host's own turn after a run: figures still open become results, through the channel."""
    return b"__import__('_cell_results').collect()\n"
