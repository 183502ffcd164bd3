#!/bin/sh
# smmvmi-cmdd TTY -- the guest end of the host's `vm exec` channel.
#
# Request line:  SMMVMI-EXEC <id> <base64 of a shell script>
# Reply lines:   SMMVMI-OUT <id>
#                <base64 of stdout, possibly several lines>
#                SMMVMI-ERR <id>
#                <base64 of stderr>
#                SMMVMI-END <id> <exit code>
# Sync:          SMMVMI-PING <id>  ->  SMMVMI-PONG <id>
#   The host pings after connecting until it gets the pong: bytes sent before
#   Linux opened the UART are lost (the 8250 driver clears the FIFO), so a
#   request is only sent once the channel has answered.
# Anything else on the line is ignored, so noise cannot run commands by accident.
tty="$1"
exec <"$tty" >"$tty" 2>/dev/console
stty raw -echo clocal 2>/dev/console
while true; do
    if ! read -r tag id b64; then
        sleep 1
        continue
    fi
    if [ "$tag" = "SMMVMI-PING" ]; then
        echo "SMMVMI-PONG $id"
        continue
    fi
    [ "$tag" = "SMMVMI-EXEC" ] || continue
    printf '%s\n' "$b64" | base64 -d >/tmp/cmd.sh 2>/dev/null
    sh /tmp/cmd.sh </dev/null >/tmp/cmd.out 2>/tmp/cmd.err
    rc=$?
    echo "SMMVMI-OUT $id"
    base64 /tmp/cmd.out
    echo "SMMVMI-ERR $id"
    base64 /tmp/cmd.err
    echo "SMMVMI-END $id $rc"
done
