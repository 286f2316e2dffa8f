// "Show More" on the top tables: fetch the next page of rows (server-rendered, escaped) and append it.
"use strict";
document.querySelectorAll("button[data-more]").forEach((button) => {
  button.addEventListener("click", async () => {
    const table = document.querySelector(`table[data-testid="table-${button.dataset.more}"] tbody`);
    if (!table) return;
    button.disabled = true;
    button.textContent = "Loading…";
    try {
      const url = `/dashboard/usage/rows?by=${encodeURIComponent(button.dataset.more)}&offset=${button.dataset.offset}`;
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const template = document.createElement("template");
      template.innerHTML = await response.text();
      table.append(template.content);
      button.dataset.offset = response.headers.get("X-Next-Offset") || button.dataset.offset;
      if (response.headers.get("X-Has-More") !== "true") {
        button.remove();
        return;
      }
      button.textContent = "Show More";
    } catch (error) {
      button.textContent = "Could not load more rows. Retry";
    }
    button.disabled = false;
  });
});
