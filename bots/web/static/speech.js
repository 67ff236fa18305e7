// The speaker toggle of the chat page: while it is on, each reply is spoken in its persona's voice.
// The audio comes from POST /v1/audio/speech as 24 kHz 16-bit PCM and plays through Web Audio
// while it streams in, so speech starts with the first sentence. The toggle shows only when the
// server speaks (GET /v1/audio/voices answers); its state is kept in localStorage.
"use strict";

(() => {
  const toggle = document.getElementById("speaker");
  const STATE_KEY = "ttt.speak";
  const RATE = 24000;
  let on = localStorage.getItem(STATE_KEY) === "on";
  let context = null; // AudioContext, made on a click: browsers start audio only after a gesture
  let current = null; // {abort: AbortController, sources: AudioBufferSourceNode[]}

  function headers() {
    const key = localStorage.getItem("ttt.apiKey");
    const result = { "Content-Type": "application/json" };
    if (key) result.Authorization = `Bearer ${key}`;
    return result;
  }

  function render() {
    toggle.setAttribute("aria-pressed", String(on));
    toggle.textContent = on ? "\u{1F50A} Voice on" : "\u{1F508} Voice off";
    toggle.title = on ? "Replies are spoken aloud; click to stop" : "Click to hear replies spoken aloud";
  }

  function audio() {
    context = context || new AudioContext({ sampleRate: RATE });
    if (context.state === "suspended") context.resume();
    return context;
  }

  function stop() {
    if (!current) return;
    current.abort.abort();
    for (const source of current.sources) source.stop();
    current = null;
  }

  // Checked when the page (re)loads its data: after the API key is given, too.
  async function refresh() {
    try {
      const response = await fetch("/v1/audio/voices", { headers: headers() });
      toggle.hidden = !response.ok;
    } catch (_) {
      toggle.hidden = true;
    }
  }

  // Speak a finished reply (`item`: its message element) if the toggle is on.
  async function speak(persona, text, item) {
    if (!on || toggle.hidden || !text) return;
    stop(); // a new reply cuts the previous one short
    const ctx = audio();
    const playing = { abort: new AbortController(), sources: [] };
    current = playing;
    item.classList.add("speaking");
    let seconds = 0;
    try {
      const response = await fetch("/v1/audio/speech", {
        method: "POST", headers: headers(), signal: playing.abort.signal,
        body: JSON.stringify({ model: persona, input: text, response_format: "pcm" }),
      });
      if (!response.ok) throw new Error(`${response.status}`);
      const reader = response.body.getReader();
      let at = ctx.currentTime + 0.05;
      let odd = null; // a byte left over from a chunk that ended mid-sample
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        let bytes = value;
        if (odd !== null) {
          bytes = new Uint8Array(value.length + 1);
          bytes.set([odd]);
          bytes.set(value, 1);
        }
        odd = bytes.length % 2 ? bytes[bytes.length - 1] : null;
        const samples = new Int16Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.length / 2));
        if (!samples.length) continue;
        const buffer = ctx.createBuffer(1, samples.length, RATE);
        const channel = buffer.getChannelData(0);
        for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
        const source = ctx.createBufferSource();
        source.buffer = buffer;
        source.connect(ctx.destination);
        at = Math.max(at, ctx.currentTime);
        source.start(at);
        at += buffer.duration;
        seconds += buffer.duration;
        playing.sources.push(source);
      }
      const last = playing.sources[playing.sources.length - 1];
      if (last) await new Promise((resolve) => { last.onended = resolve; });
      item.dataset.spokenSeconds = seconds.toFixed(2);
      item.classList.add("spoken");
    } catch (err) {
      if (err.name !== "AbortError") item.classList.add("unspoken");
    } finally {
      item.classList.remove("speaking");
      if (current === playing) current = null;
    }
  }

  toggle.addEventListener("click", () => {
    on = !on;
    localStorage.setItem(STATE_KEY, on ? "on" : "off");
    if (on) audio();
    else stop();
    render();
  });

  render();
  refresh();
  window.tttSpeech = { speak, refresh };
})();
