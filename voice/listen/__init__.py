"""Listening: people's speech in, their turns as text out. It knows nothing of Discord.

    listener = TurnTaker(config.voice.listen, on_speech=..., on_turns=...)
    listener.hear("alice-id", pcm_48k_stereo)     # each 20 ms frame of one person, as it arrives
    listener.tick()                               # now and then: silence is also the absence of frames
    transcriber.submit([(turn, on_text), ...])    # turns that ended -> their texts, off the event loop

vad.py finds speech in each person's audio (Silero VAD, one small model per speaker), turns.py cuts it
into turns (a pause that smart_turn.py judges complete ends one, else silence does; a long one is
cut), stt.py runs Whisper (faster-whisper or transformers) and transcriber.py batches the turns that
end together on one worker thread; hallucinations.py drops what Whisper says to silence and noise;
barge_in.py says when speech over the bot takes the turn and when it is only a "mhm". hearing.py is
the facade over all of it. Audio stays in memory.
"""
