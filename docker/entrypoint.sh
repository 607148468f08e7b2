#!/bin/bash
# tgi-space image entrypoint: TGI's own (tgi-entrypoint.sh), with the tgi-space shims first on PATH.
#   /opt/tgi-space/bin/text-generation-launcher  takes --speculate-mode, execs the real launcher (/usr/local/bin)
#   /opt/tgi-space/bin/text-generation-server    SPACE checkpoints -> tgi-space shard, others -> TGI's server
set -euo pipefail

ldconfig 2>/dev/null || echo 'unable to refresh ld cache, not a big deal in most cases'

# shellcheck disable=SC1091
source /usr/src/.venv/bin/activate
export PATH="/opt/tgi-space/bin:${PATH}"
exec text-generation-launcher "$@"
