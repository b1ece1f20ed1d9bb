// A stand-in for React for react.js's tests in Node (react_hooks.test.mjs maps the "react"
// import here): the hooks react.js uses, for components rendered one at a time by render().
// Effects run right after each render, like React's after a commit; a store's change renders
// its components again. Enough to drive the hooks' store; the real React is
// tests/integration/test_react_hooks.py's.

let current = null; // the component rendering, and the index of its next hook

function slot(init) {
  const c = current.c;
  const i = current.i++;
  if (!(i in c.slots)) c.slots[i] = init();
  return c.slots[i];
}

const same = (a, b) => a && b && a.length === b.length && a.every((x, i) => Object.is(x, b[i]));

export function useRef(initial) { return slot(() => ({ current: initial })); }

export function useCallback(fn, deps) {
  const s = slot(() => ({ fn, deps }));
  if (!same(s.deps, deps)) Object.assign(s, { fn, deps });
  return s.fn;
}

export function useEffect(fn, deps) {
  const s = slot(() => ({ deps: null, cleanup: null, due: true }));
  s.due = !deps || !same(s.deps, deps);
  if (s.due) Object.assign(s, { next: fn, deps });
  current.c.effects.push(s);
}

export function useSyncExternalStore(subscribe, getSnapshot) {
  const c = current.c;
  const s = slot(() => ({ subscribe: null, unsubscribe: null }));
  if (s.subscribe !== subscribe) {
    s.unsubscribe?.();
    Object.assign(s, { subscribe, unsubscribe: subscribe(() => c.mounted && c.render()) });
  }
  c.unsubscribes.add(s);
  return getSnapshot();
}

/** Render `hook` (a function calling hooks) as a component: `{value, render, unmount}`;
 * `value` is what its last render returned. */
export function render(hook) {
  const c = { slots: [], effects: [], unsubscribes: new Set(), mounted: true, value: undefined };
  c.render = () => {
    c.effects = [];
    current = { c, i: 0 };
    try { c.value = hook(); } finally { current = null; }
    for (const s of c.effects) {
      if (!s.due) continue;
      s.cleanup?.();
      s.cleanup = s.next() ?? null;
    }
    return c.value;
  };
  c.unmount = () => {
    c.mounted = false;
    for (const s of c.slots) s?.cleanup?.();
    for (const s of c.unsubscribes) s.unsubscribe?.();
  };
  c.render();
  return c;
}
