#!/usr/bin/env bash
# Runs any megalign command in the image:
#   train|convert|generate|eval|preprocess|train-tokenizer ARGS  ->  megalign-<name> ARGS
#   tiny ARGS             the tiny TP=2 x PP=2 demo (examples/tiny.sh; config overrides as ARGS)
#   torchrun ARGS, python ARGS, bash, ...  run as given
set -euo pipefail
case "${1:---help}" in
  train | convert | generate | eval | preprocess | train-tokenizer)
    command=$1
    shift
    exec "megalign-$command" "$@"
    ;;
  tiny)
    shift
    exec env MEGALIGN_SKIP_SETUP=1 MEGALIGN_PYTHON=python bash /opt/megalign/examples/tiny.sh "$@"
    ;;
  -h | --help)
    sed -n '2,5p' "$0" | cut -c3-
    ;;
  *)
    exec "$@"
    ;;
esac
