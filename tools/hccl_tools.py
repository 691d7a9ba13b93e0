"""Write the HCCL rank table (RANK_TABLE_FILE) for the Ascend devices of this machine.

    python tools/hccl_tools.py --device_num "[0,8)"

writes hccl_8p_01234567_<server_ip>.json in the current folder (or --output_dir). Takes the
same flags as MindFormers' mindformers/tools/hccl_tools.py (--device_num, --visible_devices,
--server_ip, --device_num_per_node). Each device's IP comes from `hccn_tool -i N -ip -g`
where that tool is installed, else from /etc/hccn.conf (`address_N=...` lines); --hccn_conf
names another file to read instead. Bad input prints `error: ...` and exits with 2.

The range is [START,END): START is the first device, END is one past the last; `[0,8]` is
read the same as `[0,8)`, as MindFormers' tool reads it.
"""
import argparse
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys

EXIT_BAD_INPUT = 2
DEFAULT_HCCN_CONF = "/etc/hccn.conf"
RANGE_PATTERN = re.compile(r"^\[(\d+),(\d+)[)\]]$")


class HcclToolError(Exception):
    """Bad input or missing device information; printed as one line, exit code 2."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Generate the HCCL rank table json (RANK_TABLE_FILE) for the devices of this server.")
    parser.add_argument("--device_num", type=str, default="[0,8)",
                        help='device range "[START,END)", e.g. "[0,8)" for devices 0..7, "[0,4)" for 0..3; '
                             "devices must be contiguous and, except for the full [0,8), stay in one group "
                             "of four ([0,4) or [4,8)).")
    parser.add_argument("--visible_devices", type=str, default="0,1,2,3,4,5,6,7",
                        help="physical device ids the logical ids of --device_num map to, as the container "
                             'sees them; e.g. "4,5,6,7" with --device_num "[0,4)" uses the last four chips.')
    parser.add_argument("--server_ip", type=str, default="",
                        help="IP address of this server (default: the address the host name resolves to).")
    parser.add_argument("--device_num_per_node", type=int, default=8,
                        help="number of devices on this server (default 8).")
    parser.add_argument("--hccn_conf", type=str, default="",
                        help=f"hccn.conf to read the device IPs from (default: hccn_tool where installed, "
                             f"else {DEFAULT_HCCN_CONF}).")
    parser.add_argument("--output_dir", type=str, default="",
                        help="folder for the json file (default: the current folder).")
    return parser.parse_args(argv)


def parse_device_range(text, device_num_per_node=8):
    """'[a,b)' -> list(range(a, b)), with the checks MindFormers' tool makes."""
    match = RANGE_PATTERN.match(re.sub(r"\s+", "", text or ""))
    if not match:
        raise HcclToolError(f'invalid --device_num {text!r}: expected "[START,END)" with two whole numbers, '
                            f'e.g. "[0,8)"')
    first, last = int(match.group(1)), int(match.group(2))
    if last > device_num_per_node:
        raise HcclToolError(f"--device_num {text}: END must be at most {device_num_per_node} "
                            f"(--device_num_per_node)")
    if first >= last:
        raise HcclToolError(f"--device_num {text}: START must be less than END (END is exclusive)")
    if first < 4 < last and not (first == 0 and last in (8, 16)):
        raise HcclToolError(f"--device_num {text}: devices must stay in one group, [0,4) or [4,8), "
                            f"unless all of [0,8) are used")
    return list(range(first, last))


def parse_visible_devices(text):
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise HcclToolError(f'invalid --visible_devices {text!r}: expected comma-separated device ids, '
                            f'e.g. "0,1,2,3"')
    return [str(int(item)) for item in items]


def host_ip(server_ip=""):
    """--server_ip as given (checked), else this host's address; no traffic is sent.

    The address the host name resolves to, unless that is a loopback address and the
    interface of the default route has another one.
    """
    if server_ip:
        try:
            return str(ipaddress.ip_address(server_ip.strip()))
        except ValueError as err:
            raise HcclToolError(f"invalid --server_ip {server_ip!r}: {err}") from err
    by_name = None
    try:
        by_name = socket.gethostbyname(socket.gethostname())
    except OSError:
        pass
    if by_name and not ipaddress.ip_address(by_name).is_loopback:
        return by_name
    try:  # a UDP "connect" only picks the outgoing interface; nothing is sent
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))
            address = sock.getsockname()[0]
        if not ipaddress.ip_address(address).is_unspecified:
            return address
    except OSError:
        pass
    if by_name:
        return by_name
    raise HcclToolError("could not find this host's IP address; pass --server_ip")


def ips_from_hccn_tool(physical_ids):
    """{device id: ip} from `hccn_tool -i N -ip -g`; None where the tool is missing or fails."""
    tool = shutil.which("hccn_tool")
    if tool is None:
        return None
    ips = {}
    for device_id in physical_ids:
        try:
            result = subprocess.run([tool, "-i", device_id, "-ip", "-g"], capture_output=True, text=True,
                                    timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        found = re.search(r"^\s*ipaddr\s*:\s*(\S+)", result.stdout, re.MULTILINE)
        if result.returncode != 0 or not found:
            print(f"hccn_tool gave no IP for device {device_id}; trying hccn.conf", file=sys.stderr)
            return None
        ips[device_id] = found.group(1)
    return ips


def ips_from_hccn_conf(path):
    """{device id: ip} from the `address_N=IP` lines of an hccn.conf; None where it is unreadable."""
    try:
        with open(path, encoding="utf-8") as conf:
            lines = conf.readlines()
    except OSError:
        return None
    ips = {}
    for line in lines:
        found = re.match(r"^\s*address_(\d+)\s*=\s*(\S+)\s*$", line)
        if found:
            ips[str(int(found.group(1)))] = found.group(2)
    return ips


def device_ips(physical_ids, hccn_conf=""):
    """Device IPs from --hccn_conf when given, else from hccn_tool, else from /etc/hccn.conf."""
    if hccn_conf:
        sources = [(f"--hccn_conf {hccn_conf}", lambda: ips_from_hccn_conf(hccn_conf))]
    else:
        sources = [("hccn_tool", lambda: ips_from_hccn_tool(physical_ids)),
                   (DEFAULT_HCCN_CONF, lambda: ips_from_hccn_conf(DEFAULT_HCCN_CONF))]
    for name, read in sources:
        ips = read()
        if ips is None:
            continue
        missing = [device_id for device_id in physical_ids if device_id not in ips]
        if missing:
            raise HcclToolError(f"{name} has no IP address for device(s) {', '.join(missing)}")
        print(f"device IPs from {name}")
        return ips
    if hccn_conf:
        raise HcclToolError(f"cannot read --hccn_conf {hccn_conf}")
    raise HcclToolError(f"no device IP information: hccn_tool is not installed (or failed) and "
                        f"{DEFAULT_HCCN_CONF} cannot be read; is this an Ascend server with its driver "
                        f"installed? --hccn_conf names another hccn.conf")


def build_rank_table(server_id, devices):
    """The rank table dict for one server; `devices` is [(device_id, device_ip), ...] in rank order."""
    return {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": server_id,
            "device": [{"device_id": device_id, "device_ip": device_ip, "rank_id": str(rank_id)}
                       for rank_id, (device_id, device_ip) in enumerate(devices)],
            "host_nic_ip": "reserve",
        }],
        "status": "completed",
    }


def main(argv=None):
    args = parse_args(argv)
    logical_ids = parse_device_range(args.device_num, args.device_num_per_node)
    visible = parse_visible_devices(args.visible_devices)
    if logical_ids[-1] >= len(visible):
        raise HcclToolError(f"--device_num {args.device_num} needs {logical_ids[-1] + 1} visible devices but "
                            f"--visible_devices lists {len(visible)} ({args.visible_devices})")
    physical_ids = [visible[i] for i in logical_ids]
    server_id = host_ip(args.server_ip)
    print(f"server_id: {server_id}")
    print(f"visible_devices: {visible}; devices used: {physical_ids}")

    ips = device_ips(physical_ids, args.hccn_conf)
    devices = [(device_id, ips[device_id]) for device_id in physical_ids]
    for rank_id, (device_id, device_ip) in enumerate(devices):
        print(f"rank_id: {rank_id}, device_id: {device_id}, device_ip: {device_ip}")
    table = build_rank_table(server_id, devices)

    output_dir = args.output_dir or os.getcwd()
    os.makedirs(output_dir, exist_ok=True)
    name = f"hccl_{len(logical_ids)}p_{''.join(map(str, logical_ids))}_{server_id}.json"
    path = os.path.abspath(os.path.join(output_dir, name))
    with open(path, "w", encoding="utf-8") as out:
        json.dump(table, out, indent=4)
        out.write("\n")
    print(f"Completed: hccl file was saved in: {path}")
    return path


if __name__ == "__main__":
    try:
        main()
    except HcclToolError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
