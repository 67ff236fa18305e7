"""Listening: people's speech in, their turns as text out. It knows nothing of Discord.

    listener = TurnTaker(config.voice.listen, on_speech=..., on_turns=...)
    listener.hear("alice-id", pcm_48k_stereo)     # each 20 ms frame of one person, as it arrives
    listener.tick()                               # now and then: silence is also the absence of frames
    transcriber.submit([(turn, on_text), ...])    # turns that ended -> their texts, off the event loop

vad.py finds speech in each person's audio (Silero VAD, one small model per speaker), turns.py cuts it
into turns (silence after enough speech ends one; a long one is cut), stt.py runs Whisper
(transformers or faster-whisper) and transcriber.py batches the turns that end together on one
worker thread; hallucinations.py drops what Whisper says to silence and noise. Audio stays in memory.
"""
