// The ops console's only script: progressive enhancement, the pages work without it.
// A form marked data-busy disables its button while the request runs and says what
// is happening (a bulk replay or a sync can take a while), so nobody submits twice.
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  if (!(form instanceof HTMLFormElement) || !form.dataset.busy) {
    return;
  }
  var button = form.querySelector("button[type=submit]");
  if (button) {
    // Disabled after this tick, so the button's own value is still submitted.
    setTimeout(function () { button.disabled = true; }, 0);
  }
  var note = document.createElement("span");
  note.className = "busy-note";
  note.textContent = form.dataset.busy;
  form.appendChild(note);
});
