#!/usr/bin/env bash
# A throw-away single-node OpenStack Swift (Debian 12 packages swift swift-proxy swift-object
# swift-container swift-account, 2.30) with its S3 API (s3api), for the S3 tests of sectorlog.
#
#   tests/s3/swift.sh start DIR   # ~6 s; prints S3_ENDPOINT=..., S3_ACCESS_KEY, S3_SECRET_KEY,
#                                 # S3_REGION, SWIFT_S3_DIR (also written to DIR/env)
#   tests/s3/swift.sh stop DIR    # stops the four servers (by recorded pid); DIR is left in place
#   tests/s3/swift.sh proxy-stop DIR / proxy-start DIR
#                                 # stop or start only the proxy (the S3 endpoint), for fault tests
#
# Everything lives under DIR. Swift 2.30 hard-codes /etc/swift/swift.conf, so the servers are
# started through a small Python launcher that points it at DIR/etc/swift.conf: /etc is neither
# read nor written. Env knobs: S3_PORT (proxy, default 8080; the account, container and object
# servers use OBJ_PORT, CONT_PORT, ACCT_PORT, default S3_PORT+1..3), READY_TIMEOUT (seconds, 60).
# Credentials (tempauth): access key test:tester, secret testing, region us-east-1, path-style.
# The proxy pipeline carries one extra filter, s3md5: Swift 2.30 demands Content-MD5 on
# DeleteObjects, which current AWS SDKs no longer send (they send a CRC32 checksum instead).
set -euo pipefail

usage() { echo "usage: $0 start|stop|proxy-stop|proxy-start DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
ACTION=$1
DIR=$2

stop_servers() {
[ -d "$DIR/run" ] || { echo "no swift state in $DIR" >&2; exit 2; }
pids=()
for f in "$DIR"/run/*.pid; do
  [ -e "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    pids+=("$pid")
  fi
done
for _ in $(seq 50); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 0.1
done
for pid in "${pids[@]}"; do
  kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
done
rm -f "$DIR"/run/*.pid
echo "stopped"
}

PY=/usr/bin/python3          # Debian's python (swift is in dist-packages)
ETC=$DIR/etc

start() {  # $1 = server name (object-server ...); setsid: its pid is its process group
  PYTHONPATH=$DIR/run SWIFT_S3_ETC=$ETC setsid "$PY" "$DIR/run/launch.py" "$1" "$ETC/$1.conf" \
    >>"$DIR/log/$1.log" 2>&1 < /dev/null &
  echo $! > "$DIR/run/$1.pid"
}

proxy_stop() {
  local pid
  pid=$(cat "$DIR/run/proxy-server.pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$DIR/run/proxy-server.pid"
  echo "proxy stopped"
}

proxy_start() {
  local endpoint
  endpoint=$(sed -n 's/^S3_ENDPOINT=//p' "$DIR/env")
  start proxy-server
  for _ in $(seq 300); do
    curl -fsS -o /dev/null "$endpoint/healthcheck" 2>/dev/null && { echo "proxy started"; return; }
    sleep 0.1
  done
  echo "proxy not ready after 30 s; log in $DIR/log/proxy-server.log" >&2
  exit 1
}

case "$ACTION" in
  start) ;;
  stop) stop_servers; exit 0 ;;
  proxy-stop) proxy_stop; exit 0 ;;
  proxy-start) proxy_start; exit 0 ;;
  *) usage ;;
esac

S3_PORT=${S3_PORT:-8080}
OBJ_PORT=${OBJ_PORT:-$((S3_PORT + 1))}
CONT_PORT=${CONT_PORT:-$((S3_PORT + 2))}
ACCT_PORT=${ACCT_PORT:-$((S3_PORT + 3))}
READY_TIMEOUT=${READY_TIMEOUT:-60}
WORKERS=${SWIFT_WORKERS:-0}   # 0 = no fork, one process per server
RUN_USER=$(id -un)
HOST=127.0.0.1

mkdir -p "$DIR"/{etc,srv/node/d1,run,log,cache}

# ---------------------------------------------------------------- swift.conf
cat > "$ETC/swift.conf" <<EOF
[swift-hash]
swift_hash_path_suffix = test-suffix
swift_hash_path_prefix = test-prefix

[storage-policy:0]
name = Policy-0
default = yes

[swift-constraints]
EOF

# ------------------------------------------------------------ common DEFAULT
common_default() {  # $1 = port
  cat <<EOF
[DEFAULT]
bind_ip = $HOST
bind_port = $1
workers = $WORKERS
user = $RUN_USER
swift_dir = $ETC
devices = $DIR/srv/node
mount_check = false
disable_fallocate = true
fallocate_reserve = 0
log_level = INFO
log_address = $DIR/run/nonexistent-log-socket
log_statsd_host =
EOF
}

{ common_default "$OBJ_PORT"; cat <<EOF

[pipeline:main]
pipeline = healthcheck object-server

[app:object-server]
use = egg:swift#object

[filter:healthcheck]
use = egg:swift#healthcheck

[object-replicator]
[object-updater]
[object-auditor]
[object-reconstructor]
EOF
} > "$ETC/object-server.conf"

{ common_default "$CONT_PORT"; cat <<EOF

[pipeline:main]
pipeline = healthcheck container-server

[app:container-server]
use = egg:swift#container
allow_versions = true

[filter:healthcheck]
use = egg:swift#healthcheck

[container-replicator]
[container-updater]
[container-auditor]
[container-sync]
[container-sharder]
EOF
} > "$ETC/container-server.conf"

{ common_default "$ACCT_PORT"; cat <<EOF

[pipeline:main]
pipeline = healthcheck account-server

[app:account-server]
use = egg:swift#account

[filter:healthcheck]
use = egg:swift#healthcheck

[account-replicator]
[account-auditor]
[account-reaper]
EOF
} > "$ETC/account-server.conf"

# ---------------------------------------------------------------- proxy
# 'cache' is required by tempauth: we use an in-process dict cache (no
# memcached process).  's3md5' adds the Content-MD5 header that swift 2.30
# demands for DeleteObjects (POST ?delete) when the client sent only an
# x-amz-checksum-* header (AWS SDK v3 >= 3.729 default).
cat > "$ETC/proxy-server.conf" <<EOF
[DEFAULT]
bind_ip = $HOST
bind_port = $S3_PORT
workers = $WORKERS
user = $RUN_USER
swift_dir = $ETC
log_level = INFO
log_address = $DIR/run/nonexistent-log-socket

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk s3md5 s3api tempauth copy slo dlo versioned_writes symlink proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true

[filter:s3api]
use = egg:swift#s3api
location = us-east-1
s3_acl = false
dns_compliant_bucket_names = true
allow_multipart_uploads = true
check_bucket_owner = false

[filter:tempauth]
use = egg:swift#tempauth
user_admin_admin = admin .admin .reseller_admin
user_test_tester = testing .admin
user_test2_tester2 = testing2 .admin

[filter:cache]
paste.filter_factory = swift_s3_shims:dict_cache_factory

[filter:s3md5]
paste.filter_factory = swift_s3_shims:content_md5_factory

[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:bulk]
use = egg:swift#bulk
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
[filter:versioned_writes]
use = egg:swift#versioned_writes
allow_versioned_writes = true
[filter:symlink]
use = egg:swift#symlink
EOF

# ---------------------------------------------------------------- rings
# part_power 6, 1 replica, min_part_hours 1, one device each.  Built in one
# python process (9 swift-ring-builder CLI calls cost ~6 s).
"$PY" - "$ETC" "$HOST" "$OBJ_PORT" "$CONT_PORT" "$ACCT_PORT" <<'EOF'
import sys, os
from swift.common.ring import RingBuilder
etc, host = sys.argv[1], sys.argv[2]
for name, port in zip(('object', 'container', 'account'), sys.argv[3:6]):
    b = RingBuilder(6, 1, 1)
    b.add_dev({'region': 1, 'zone': 1, 'ip': host, 'port': int(port),
               'device': 'd1', 'weight': 100, 'meta': ''})
    b.rebalance()
    b.save(os.path.join(etc, name + '.builder'))
    b.get_ring().save(os.path.join(etc, name + '.ring.gz'))
EOF
for name in object container account; do
  test -s "$ETC/$name.ring.gz" || { echo "ring $name not built" >&2; exit 1; }
done

# ---------------------------------------------------------------- launcher
# Repoint swift.conf to $ETC/swift.conf before run_wsgi() loads anything.
cat > "$DIR/run/launch.py" <<'EOF'
import sys, os
etc = os.environ['SWIFT_S3_ETC']
from swift.common import utils
utils.SWIFT_CONF_FILE = os.path.join(etc, 'swift.conf')
utils.HASH_PATH_PREFIX = b''
utils.HASH_PATH_SUFFIX = b''
utils.validate_configuration()
from swift.common import storage_policy
storage_policy.reload_storage_policies()
from swift.common.wsgi import run_wsgi
server, conf = sys.argv[1], sys.argv[2]
sys.exit(run_wsgi(conf, server, verbose=True))
EOF

cat > "$DIR/run/swift_s3_shims.py" <<'EOF'
import base64, hashlib, io, time


class DictCache(object):
    # minimal in-process stand-in for swift.common.memcached.MemcacheRing
    def __init__(self):
        self.d = {}

    def _get(self, key):
        v = self.d.get(key)
        if v is None:
            return None
        if v[1] and v[1] < time.time():
            self.d.pop(key, None)
            return None
        return v[0]

    def get(self, key, raise_on_error=False):
        return self._get(key)

    def set(self, key, value, serialize=True, time=0, min_compress_len=0,
            raise_on_error=False):
        exp = 0
        if time:
            exp = time if time > 2592000 else __import__('time').time() + time
        self.d[key] = (value, exp)

    def get_multi(self, keys, server_key, raise_on_error=False):
        return [self._get(k) for k in keys]

    def set_multi(self, mapping, server_key, serialize=True, time=0,
                  min_compress_len=0, raise_on_error=False):
        for k, v in mapping.items():
            self.set(k, v, time=time)

    def incr(self, key, delta=1, time=0):
        v = int(self._get(key) or 0) + int(delta)
        self.set(key, v, time=time)
        return v

    def decr(self, key, delta=1, time=0):
        return self.incr(key, -int(delta), time)

    def delete(self, key, server_key=None):
        self.d.pop(key, None)


def dict_cache_factory(global_conf, **local_conf):
    cache = DictCache()

    def filt(app):
        def mw(env, start_response):
            env['swift.cache'] = cache
            return app(env, start_response)
        return mw
    return filt


def content_md5_factory(global_conf, **local_conf):
    def filt(app):
        def mw(env, start_response):
            qs = env.get('QUERY_STRING', '')
            if (env.get('REQUEST_METHOD') == 'POST'
                    and 'delete' in [p.split('=', 1)[0]
                                     for p in qs.split('&')]
                    and 'HTTP_CONTENT_MD5' not in env):
                cl = env.get('CONTENT_LENGTH')
                body = (env['wsgi.input'].read(int(cl)) if cl
                        else env['wsgi.input'].read())
                env['HTTP_CONTENT_MD5'] = base64.b64encode(
                    hashlib.md5(body).digest()).decode('ascii')
                env['wsgi.input'] = io.BytesIO(body)
                env['CONTENT_LENGTH'] = str(len(body))
            return app(env, start_response)
        return mw
    return filt
EOF

start account-server
start container-server
start object-server
start proxy-server

# ---------------------------------------------------------------- readiness
deadline=$((SECONDS + READY_TIMEOUT))
for port in $ACCT_PORT $CONT_PORT $OBJ_PORT $S3_PORT; do
  until curl -fsS -o /dev/null "http://$HOST:$port/healthcheck" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      echo "swift not ready after ${READY_TIMEOUT}s (port $port); logs in $DIR/log" >&2
      tail -n 20 "$DIR"/log/*.log >&2 || true
      exit 1
    fi
    for s in account-server container-server object-server proxy-server; do
      if ! kill -0 "$(cat "$DIR/run/$s.pid")" 2>/dev/null; then
        echo "$s died; log:" >&2; tail -n 40 "$DIR/log/$s.log" >&2; exit 1
      fi
    done
    sleep 0.1
  done
done
# end-to-end: tempauth token + account HEAD (autocreates nothing, 204/200 ok)
tok=$(curl -fsS -D - -o /dev/null -H 'X-Storage-User: test:tester' \
        -H 'X-Storage-Pass: testing' "http://$HOST:$S3_PORT/auth/v1.0" \
      | tr -d '\r' | awk -F': ' 'tolower($1)=="x-auth-token"{print $2}')
test -n "$tok" || { echo "tempauth failed" >&2; exit 1; }

cat > "$DIR/env" <<EOF
S3_ENDPOINT=http://$HOST:$S3_PORT
S3_ACCESS_KEY=test:tester
S3_SECRET_KEY=testing
S3_REGION=us-east-1
SWIFT_S3_DIR=$DIR
EOF
cat "$DIR/env"
