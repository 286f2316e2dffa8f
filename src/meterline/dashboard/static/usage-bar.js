// The usage bar follows the organization's credits while requests stream: it polls its JSON twin and
// updates the text, the bar and the buttons. Only text is written (textContent), never HTML.
"use strict";
(() => {
  const root = document.querySelector("[data-testid=usage-bar]");
  if (!root) return;
  const every = Math.max(200, Number(root.dataset.pollMs) || 2000);
  const field = (name) => root.querySelector(`[data-field="${name}"]`);
  const progress = root.querySelector("[role=progressbar]");

  function show(state) {
    root.dataset.used = state.used;
    root.dataset.pct = state.used_pct ?? "";
    field("label").textContent = state.label;
    field("pct_label").textContent = state.pct_label;
    // Unlimited plans have no allocation to fill: no bar, no percentage.
    field("pct_label").hidden = state.used_pct === null;
    progress.hidden = state.used_pct === null;
    field("bar").style.width = `${state.bar_pct ?? 0}%`;
    progress.setAttribute("aria-valuenow", state.used_pct ?? "0");
    field("upgrade").hidden = !state.show_upgrade;
    field("referral").hidden = !state.show_referral;
  }

  async function poll() {
    try {
      const response = await fetch(root.dataset.source, { credentials: "same-origin", cache: "no-store" });
      if (response.ok) show(await response.json());
    } catch (error) {
      // A missed refresh is retried at the next tick.
    }
    setTimeout(poll, every);
  }
  setTimeout(poll, every);
})();
