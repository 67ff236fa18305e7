// The chat page: one conversation per browser (its id lives in localStorage), replies streamed
// as server-sent events over fetch. Plain JavaScript, no build step.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const log = $("log");
  const personaSelect = $("persona");
  const personaDescription = $("persona-description");
  const resetButton = $("reset");
  const forgetButton = $("forget");
  const statusLine = $("status");
  const keyForm = $("key-form");
  const keyInput = $("api-key");
  const composer = $("composer");
  const input = $("input");
  const sendButton = $("send");

  const ID_KEY = "ttt.conversation";
  const API_KEY = "ttt.apiKey";
  const conversationId = loadConversationId();
  const conversationPath = `/api/conversations/${conversationId}`;
  let apiKey = localStorage.getItem(API_KEY) || "";
  let personas = [];
  let currentPersona = "";
  let replying = false;

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function loadConversationId() {
    let id = localStorage.getItem(ID_KEY);
    if (!id || !/^[A-Za-z0-9_-]{8,64}$/.test(id)) {
      // crypto.randomUUID needs a secure context; a LAN address over http is not one.
      const bytes = crypto.getRandomValues(new Uint8Array(16));
      id = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
      localStorage.setItem(ID_KEY, id);
    }
    return id;
  }

  async function api(method, path, body) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.ok) return response;
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message || message;
    } catch (_) { /* not our JSON: keep the status line */ }
    if (response.status === 401) askForKey(apiKey ? "That key was not accepted; try again." : "");
    throw new ApiError(response.status, message);
  }

  // Server-sent events from a fetch response: yields {event, data}.
  async function* events(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  function addMessage(role, text, extraClass) {
    const item = document.createElement("div");
    item.className = `message ${role}${extraClass ? ` ${extraClass}` : ""}`;
    item.textContent = text;
    log.append(item);
    log.scrollTop = log.scrollHeight;
    return item;
  }

  function setText(item, text) {
    item.textContent = text;
    log.scrollTop = log.scrollHeight;
  }

  function showStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", Boolean(isError));
    statusLine.hidden = !text;
  }

  function setEnabled(enabled) {
    const on = enabled && !replying;
    input.disabled = !on;
    sendButton.disabled = !on;
    personaSelect.disabled = !on;
    resetButton.disabled = !on;
    forgetButton.disabled = !on;
  }

  function askForKey(message) {
    keyForm.hidden = false;
    composer.hidden = true;
    setEnabled(false);
    showStatus(message, Boolean(message));
    keyInput.focus();
  }

  function describePersona(name) {
    const persona = personas.find((p) => p.name === name);
    personaDescription.textContent = persona ? persona.description : "";
  }

  async function load() {
    const listing = await (await api("GET", "/api/personas")).json();
    personas = listing.personas;
    personaSelect.replaceChildren(...personas.map((p) => {
      const option = document.createElement("option");
      option.value = p.name;
      option.textContent = p.available ? p.name : `${p.name} (unavailable)`;
      return option;
    }));
    const history = await (await api("GET", conversationPath)).json();
    currentPersona = history.persona.name;
    personaSelect.value = currentPersona;
    describePersona(currentPersona);
    log.replaceChildren();
    for (const turn of history.turns) addMessage(turn.role, turn.text);
    keyForm.hidden = true;
    composer.hidden = false;
    showStatus("");
    setEnabled(true);
    input.focus();
    if (window.tttSpeech) window.tttSpeech.refresh(); // speech.js: show the speaker toggle if the server speaks
  }

  async function send(text) {
    replying = true;
    setEnabled(false);
    const mine = addMessage("user", text);
    const reply = addMessage("bot", "", "streaming");
    let finished = false;
    try {
      const response = await api("POST", `${conversationPath}/messages`, { text });
      for await (const { event, data } of events(response)) {
        if (event === "error") throw new ApiError(500, data.error.message);
        setText(reply, data.text);
        if (event === "done") finished = true;
      }
      if (!finished) throw new ApiError(0, "The reply was cut off; please try again.");
      showStatus("");
      if (window.tttSpeech) window.tttSpeech.speak(currentPersona, reply.textContent, reply); // speech.js
    } catch (err) {
      mine.classList.add("unsent"); // the server stored nothing: this message is not in the history
      reply.classList.add("error");
      setText(reply, err instanceof ApiError ? err.message : `Could not reach the server: ${err.message}`);
      if (!input.value) input.value = text;
    } finally {
      reply.classList.remove("streaming");
      replying = false;
      if (keyForm.hidden) {
        setEnabled(true);
        input.focus();
      }
    }
  }

  async function switchPersona(name) {
    setEnabled(false);
    try {
      const data = await (await api("PUT", `${conversationPath}/persona`, { persona: name })).json();
      currentPersona = data.persona.name;
      describePersona(currentPersona);
      addMessage("note", `Now talking to ${currentPersona}.`);
      showStatus("");
    } catch (err) {
      personaSelect.value = currentPersona;
      showStatus(err.message, true);
    } finally {
      if (keyForm.hidden) setEnabled(true);
    }
  }

  async function reset() {
    setEnabled(false);
    try {
      await api("POST", `${conversationPath}/reset`);
      log.replaceChildren();
      addMessage("note", "Conversation reset: a fresh start.");
      showStatus("");
    } catch (err) {
      showStatus(err.message, true);
    } finally {
      if (keyForm.hidden) setEnabled(true);
    }
  }

  async function forgetMe() {
    if (!confirm("Delete everything you have written here, and the replies to it?")) return;
    setEnabled(false);
    try {
      const data = await (await api("POST", `${conversationPath}/forget-me`)).json();
      log.replaceChildren();
      addMessage("note", `Forgotten: ${data.deleted} message(s) deleted from the server.`);
      showStatus("");
    } catch (err) {
      showStatus(err.message, true);
    } finally {
      if (keyForm.hidden) setEnabled(true);
    }
  }

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || replying) return;
    input.value = "";
    send(text);
  });

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });

  personaSelect.addEventListener("change", () => switchPersona(personaSelect.value));
  resetButton.addEventListener("click", reset);
  forgetButton.addEventListener("click", forgetMe);

  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = keyInput.value.trim();
    localStorage.setItem(API_KEY, apiKey);
    keyInput.value = "";
    start();
  });

  function start() {
    load().catch((err) => {
      if (!(err instanceof ApiError && err.status === 401)) showStatus(`Could not load the chat: ${err.message}`, true);
    });
  }

  start();
})();
