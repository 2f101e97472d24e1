#!/bin/sh
# read_only_root.sh MODEL_DIR COMMAND...: run COMMAND the way the manifests run a container
# (readOnlyRootFilesystem: true, an emptyDir at /tmp, the model folder read-only): in a private mount
# namespace (unshare -rm) every mount is made read-only, MODEL_DIR appears read-only at /srv and /tmp is
# an empty tmpfs. Nothing outside the namespace changes.
set -e
model="$1"; shift
mount --bind "$model" /srv
for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  mount -o remount,bind,ro "$m" || echo "read_only_root.sh: could not make $m read-only" >&2
done
mount -t tmpfs -o size=512m tmpfs /tmp
exec "$@"
