#!/bin/sh
# /init of the smmvmi test guest (busybox). Generated into the initramfs by
# smmvmi-tests::guest_image; @MODULES@ is replaced with the module load order.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /run
mount -t tmpfs tmp /tmp
exec </dev/console >/dev/console 2>&1

for m in @MODULES@; do
    if [ -f "/lib/modules/$m.ko" ]; then
        insmod "/lib/modules/$m.ko" || echo "smmvmi-init: insmod $m failed (continuing)"
    else
        echo "smmvmi-init: module $m not in the image (built in or absent; continuing)"
    fi
done

# ACPI power button (libvirt's `virsh shutdown` and `virsh reboot` press
# it): with @ACPI_FLAG@ on the command line, busybox acpid powers off.
if grep -qw @ACPI_FLAG@ /proc/cmdline; then
    for m in @ACPI_MODULES@; do
        insmod "/lib/modules/$m.ko" || echo "smmvmi-init: insmod $m failed (continuing)"
    done
    mkdir -p /etc/acpi/PWRF
    printf '#!/bin/sh\necho "smmvmi-init: ACPI power button: powering off" >/dev/console\nsync\npoweroff -f\n' >/etc/acpi/PWRF/00000080
    chmod 755 /etc/acpi/PWRF/00000080
    acpid -c /etc/acpi -l /tmp/acpid.log
fi

hostname smmvmi-guest
echo "smmvmi-init: $(nproc) cpus, $(grep MemTotal /proc/meminfo)"

# The command server owns ttyS1 (the host's `vm exec` channel).
if [ -c /dev/ttyS1 ]; then
    smmvmi-cmdd /dev/ttyS1 &
else
    echo "smmvmi-init: /dev/ttyS1 missing: no command channel"
fi
echo "@READY@"

# PID 1 must never exit; reap orphans and idle.
while true; do
    wait
    sleep 3600
done
