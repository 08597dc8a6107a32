# The checks of tests/deb_install.sh, run by bash inside a booted bookworm container
# (tests/nspawn/check-unit.sh) with the packages bound at /debs: nn-gateway_1.deb and
# nn-gateway_2.deb (the same package, a higher version). The root has Mosquitto (started at
# boot) and ca-certificates, the package's other dependency. Each step prints `ok …`, or
# `FAIL …` and the unit's journal.
#
# Everything runs in main() with stdin from /dev/null: bash reads this script from stdin, and
# a command that reads stdin (dpkg asking about a conffile, say) would swallow the rest of it.
set -uo pipefail

U=nn-gateway.service
CONF=/etc/nn-gateway/gateway.toml
DB=/var/lib/nn-gateway/data/gateway.db

step() { echo "--- $*"; }
ok() { echo "ok   $*"; }
fail() {
    echo "FAIL $*"
    echo "--- journal of $U (last 40 lines):"
    journalctl -u "$U" --no-pager -n 40 -o short-monotonic
    exit 1
}
prop() { systemctl show -p "$1" --value "$U"; }
# wait_until SECONDS COMMAND…: polls COMMAND every 0.2 s; fails after SECONDS.
wait_until() {
    local end=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -ge "$end" ] && return 1
        sleep 0.2
    done
}
# The operator commands, as the service's user; they find the database in /var/lib/nn-gateway.
as_gw() { runuser -u nn-gateway -- nn-gateway "$@" -c "$CONF"; }
healthz_ok() {
    local line=
    {
        printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
        read -r line <&3
    } 3<>/dev/tcp/127.0.0.1/8080 2>/dev/null || return 1
    [[ $line == *" 200"* ]]
}
journal_has() { journalctl -u "$U" --no-pager -o cat | grep -qF -- "$1"; }
has_sensor() { as_gw devices 2>/dev/null | grep -q sensor-1; }
active() { [ "$(systemctl is-active "$U")" = active ]; }
gateway_processes() { grep -lx nn-gateway /proc/[0-9]*/comm 2>/dev/null | wc -l; }

main() {
    step "install without a broker"
    systemctl stop mosquitto || fail "could not stop mosquitto in the container"
    out=$(dpkg -i /debs/nn-gateway_1.deb 2>&1) || { echo "$out"; fail "dpkg -i nn-gateway_1.deb failed"; }
    active || fail "after dpkg -i the service is $(systemctl is-active "$U"), not active: postinst did not start it, or READY=1 (Type=notify) never came"
    ok "dpkg -i installed and started the service: active, so READY=1 arrived (Type=notify)"
    [ "$(systemctl is-enabled "$U")" = enabled ] || fail "the service is $(systemctl is-enabled "$U") after install, not enabled"
    ok "enabled (starts at boot)"
    status=$(prop StatusText)
    [ -n "$status" ] || fail "no STATUS= text from the daemon"
    ok "STATUS=: $status"
    pid=$(prop MainPID)
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
    gw_uid=$(id -u nn-gateway) || fail "postinst did not create the user nn-gateway (systemd-sysusers)"
    [ "$uid" = "$gw_uid" ] && [ "$uid" != 0 ] || fail "the daemon (pid $pid) runs as uid $uid, not as nn-gateway ($gw_uid)"
    ok "runs as its own user nn-gateway (uid $uid), not root"
    [ -f "$DB" ] || fail "no $DB: the shipped relative storage.path should resolve under StateDirectory="
    [ "$(stat -c %U "$DB")" = nn-gateway ] || fail "$DB is owned by $(stat -c %U "$DB"), not nn-gateway"
    ok "the shipped config, unedited, put the database at $DB"
    [ "$(stat -c '%a %U' /etc/nn-gateway/credentials 2>&1)" = "700 root" ] ||
        fail "/etc/nn-gateway/credentials is '$(stat -c '%a %U' /etc/nn-gateway/credentials 2>&1)', not '700 root' (tmpfiles entry)"
    ok "/etc/nn-gateway/credentials exists, 0700 root"
    wait_until 10 healthz_ok || fail "GET http://127.0.0.1:8080/healthz did not answer 200"
    ok "GET /healthz on 127.0.0.1:8080 answers 200"

    step "waits calmly for the broker"
    sleep 5
    active || fail "without a broker the service became $(systemctl is-active "$U")"
    [ "$(prop NRestarts)" = 0 ] || fail "restarted $(prop NRestarts) times without a broker"
    warnings=$(journalctl -u "$U" --no-pager -o cat | grep -c broker)
    ok "5 s without a broker: still active, NRestarts=0, $warnings journal lines about it"
    as_gw status | grep '^daemon' || fail "nn-gateway status (as nn-gateway) failed"

    step "connects once mosquitto starts; stores what is published"
    systemctl start mosquitto || fail "could not start mosquitto"
    wait_until 70 journal_has "connected to broker" || fail "no 'connected to broker' within 70 s of mosquitto starting"
    wait_until 10 sh -c "systemctl show -p StatusText --value $U | grep -q 'mqtt connected'" ||
        fail "the journal says connected, STATUS= does not: $(prop StatusText)"
    ok "connected to the broker: 'connected to broker' in the journal, STATUS=: $(prop StatusText)"
    mosquitto_pub -h 127.0.0.1 -q 1 -t devices/sensor-1/state -m '{"temp":21.5,"fw":"1.0"}' || fail "mosquitto_pub failed"
    wait_until 10 has_sensor || fail "the state published to devices/sensor-1/state is not in 'nn-gateway devices'"
    ok "a state published with mosquitto_pub is stored (nn-gateway devices, as user nn-gateway)"

    step "the watchdog is kept; restart keeps the data"
    [ "$(prop WatchdogUSec)" = 30s ] || fail "WatchdogUSec=$(prop WatchdogUSec), not the unit's 30s"
    ok "watchdog armed: WatchdogUSec=30s"
    # A short period so that several pass in seconds: the daemon pings at half of WATCHDOG_USEC.
    mkdir -p "/run/systemd/system/$U.d"
    printf '[Service]\nWatchdogSec=2s\n' >"/run/systemd/system/$U.d/watchdog.conf"
    systemctl daemon-reload
    systemctl restart "$U" || fail "systemctl restart failed"
    has_sensor || fail "after systemctl restart sensor-1 is gone"
    ok "systemctl restart: active again, the stored state kept"
    first=$(prop WatchdogTimestampMonotonic)
    sleep 7
    active && [ "$(prop NRestarts)" = 0 ] || fail "with WatchdogSec=2s the service did not survive 7 s ($(prop Result), NRestarts=$(prop NRestarts))"
    last=$(prop WatchdogTimestampMonotonic)
    [ "$last" -gt "$first" ] || fail "no WATCHDOG=1 seen by systemd in 7 s (WatchdogTimestampMonotonic $first -> $last)"
    ok "WatchdogSec=2s: 7 s (3 periods) later still active, NRestarts=0, last ping $(((last - first) / 1000)) ms after the first"

    step "API keys through LoadCredential=, never in the journal"
    secret="nspawn-secret-$RANDOM$RANDOM$RANDOM"
    install -m 0600 /dev/null /etc/nn-gateway/credentials/golioth-api-key
    echo "$secret" >/etc/nn-gateway/credentials/golioth-api-key
    # Golioth on, at a loopback address where nothing listens: the lane starts only with a key.
    printf '[Service]\nEnvironment=NNGW_GOLIOTH__ENABLED=true NNGW_GOLIOTH__PROJECT_ID=nspawn NNGW_GOLIOTH__API_URL=http://127.0.0.1:9\n' \
        >"/run/systemd/system/$U.d/golioth.conf"
    rm "/run/systemd/system/$U.d/watchdog.conf"
    systemctl daemon-reload
    systemctl restart "$U" || fail "with Golioth enabled and its key in /etc/nn-gateway/credentials the service did not start"
    wait_until 10 sh -c "systemctl show -p StatusText --value $U | grep -q golioth" ||
        fail "STATUS= names no golioth lane: $(prop StatusText)"
    ok "Golioth enabled with the key from the credential: active, STATUS=: $(prop StatusText)"
    sleep 1
    if journalctl --no-pager -o export | grep -qF "$secret"; then fail "the API key appears in the journal"; fi
    ok "the key appears nowhere in the journal (all units, all fields)"
    rm "/run/systemd/system/$U.d/golioth.conf" /etc/nn-gateway/credentials/golioth-api-key
    systemctl daemon-reload

    step "sandbox"
    sec=$(systemd-analyze security "$U" 2>&1 | sed -n "s/.*Overall exposure level for $U: \([0-9.]*\).*/\1/p")
    [ -n "$sec" ] || fail "systemd-analyze security printed no exposure level"
    awk -v s="$sec" 'BEGIN { exit !(s <= 2.0) }' || fail "systemd-analyze security rates the running service $sec, above 2.0"
    ok "systemd-analyze security (online, the running service): $sec"

    step "clean stop"
    systemctl stop "$U" || fail "systemctl stop failed"
    [ "$(prop Result)" = success ] && [ "$(prop ExecMainStatus)" = 0 ] ||
        fail "systemctl stop: Result=$(prop Result), exit status $(prop ExecMainStatus), not success and 0"
    journal_has "store closed" || fail "no 'store closed' in the journal after systemctl stop"
    ok "systemctl stop: exit status 0, 'store closed' in the journal"

    step "upgrade keeps the edited config and the data, and restarts"
    systemctl start "$U" || fail "systemctl start failed"
    old_pid=$(prop MainPID)
    sed -i 's/^rejected_keep = 1000$/rejected_keep = 999/' "$CONF"
    echo "# edited by the install test" >>"$CONF"
    out=$(dpkg -i /debs/nn-gateway_2.deb 2>&1) || { echo "$out"; fail "dpkg -i nn-gateway_2.deb (upgrade) failed"; }
    version=$(dpkg-query -W -f '${Version}' nn-gateway)
    grep -qx 'rejected_keep = 999' "$CONF" && grep -qx '# edited by the install test' "$CONF" ||
        fail "the upgrade to $version lost the edit of $CONF"
    ok "upgraded to $version; the edited conffile was kept"
    active || fail "after the upgrade the service is $(systemctl is-active "$U")"
    [ "$(prop MainPID)" != "$old_pid" ] || fail "the upgrade did not restart the service (pid still $old_pid)"
    has_sensor || fail "after the upgrade sensor-1 is gone from the database"
    ok "active again after the upgrade (pid $old_pid -> $(prop MainPID)), the stored state kept"

    step "remove stops the service"
    out=$(dpkg -r nn-gateway 2>&1) || { echo "$out"; fail "dpkg -r failed"; }
    ! active || fail "after dpkg -r the service is still active"
    [ "$(gateway_processes)" = 0 ] || fail "after dpkg -r an nn-gateway process still runs"
    [ -f "$CONF" ] && [ -f "$DB" ] || fail "dpkg -r should keep the conffile and the database"
    ok "dpkg -r: stopped, no nn-gateway process; config and database kept"

    step "purge"
    out=$(dpkg -P nn-gateway 2>&1) || { echo "$out"; fail "dpkg -P failed"; }
    [ ! -e /etc/nn-gateway ] || fail "after dpkg -P /etc/nn-gateway still exists: $(find /etc/nn-gateway)"
    [ -f "$DB" ] || fail "dpkg -P deleted $DB; the package documents that purge keeps it"
    grep -q "keeps the database in /var/lib/nn-gateway" <<<"$out" || { echo "$out"; fail "dpkg -P did not say that the database is kept"; }
    ok "dpkg -P: /etc/nn-gateway removed; $DB kept, and said so: $(grep -F 'keeps the database' <<<"$out")"

    step "a bad config stops with one journal line and no restart"
    out=$(dpkg -i /debs/nn-gateway_1.deb 2>&1) || { echo "$out"; fail "reinstalling after the purge failed"; }
    active && has_sensor || fail "reinstalled after the purge, the service should run on the kept database"
    ok "reinstalled after the purge: active on the kept database (sensor-1 still there)"
    sed -i 's/^synchronous = "full"$/synchronous = "fsync"/' "$CONF"
    grep -qx 'synchronous = "fsync"' "$CONF" || fail "could not set synchronous = \"fsync\" in $CONF"
    systemctl restart "$U" && fail "with synchronous = \"fsync\" the service started"
    sleep 6 # past RestartSec=5s: a restart would have happened by now
    [ "$(prop ExecMainStatus)" = 78 ] || fail "a config error exited with $(prop ExecMainStatus), not 78"
    [ "$(prop NRestarts)" = 0 ] && [ "$(systemctl is-active "$U")" = failed ] ||
        fail "after a config error: $(systemctl is-active "$U"), NRestarts=$(prop NRestarts); want failed, 0"
    lines=$(journalctl -u "$U" --no-pager -o cat "_SYSTEMD_INVOCATION_ID=$(prop InvocationID)" | grep -F synchronous)
    [ "$(grep -c . <<<"$lines")" = 1 ] || fail "want one journal line naming synchronous, got: $lines"
    ok "exit 78, failed, NRestarts=0; the journal line: $lines"
}

main </dev/null
