"""Benchmark of the secure channel (not a test): `.venv/bin/python tests/bench_noise.py [--quick]`.

1. Full Noise XX handshakes per second on one core, both ends in this process, each verifying the
   other's certificate (enroll signature, validity, revocation) - goal >= 1,000/s.
2. Transport throughput for 64 KiB application messages through `SecureSession.send_message` and
   `receive_frame` (chunking, framing, rekey included), against raw
   `crypto_aead_chacha20poly1305_ietf_encrypt`/`_decrypt` on the same 65,536 bytes in the same run -
   goal ratio >= 0.8.

Figures are best-of-N wall-clock runs (time.perf_counter), to damp scheduler noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nacl import bindings  # noqa: E402

from protocol.channel import LocalIdentity, SecureSession  # noqa: E402
from protocol.trust import TrustedState  # noqa: E402
from simulations.identities import T0, make_authority, make_node  # noqa: E402
from tests.fixtures import sign_sample  # noqa: E402

MESSAGE_BYTES = 64 * 1024


def best_of(repeats: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeats))


def bench_handshakes(count: int, repeats: int) -> tuple[float, float]:
    auth = make_authority()
    a_ident, b_ident = make_node(auth, "node-a"), make_node(auth, "node-b", roles=("db",))
    trust_a, trust_b = TrustedState(auth.root_bytes), TrustedState(auth.root_bytes)
    policy = sign_sample(auth, 1)
    trust_a.accept_policy(policy, T0)
    trust_b.accept_policy(policy, T0)
    # built once per process by the daemon, shared by every session
    a_id = LocalIdentity(a_ident.static_private, a_ident.cert_bytes)
    b_id = LocalIdentity(b_ident.static_private, b_ident.cert_bytes)

    def one_run() -> float:
        start = time.perf_counter()
        for _ in range(count):
            a = SecureSession(
                initiator=True,
                trust=trust_a,
                identity=a_id,
                entropy=os.urandom,
                now_ms=0,
            )
            b = SecureSession(
                initiator=False,
                trust=trust_b,
                identity=b_id,
                entropy=os.urandom,
                now_ms=0,
            )
            for src, dst in ((a, b), (b, a), (a, b)):
                for frame in src.frames_to_send():
                    dst.receive_frame(frame, 1, T0)
            if a.handshake_hash is None or a.handshake_hash != b.handshake_hash:
                raise SystemExit("handshake failed")
        return time.perf_counter() - start

    elapsed = best_of(repeats, one_run)
    return count / elapsed, elapsed / count * 1e6


def open_pair() -> tuple[SecureSession, SecureSession]:
    auth = make_authority()
    a_ident, b_ident = make_node(auth, "node-a"), make_node(auth, "node-b")
    a = SecureSession(
        initiator=True,
        trust=TrustedState(auth.root_bytes),
        identity=LocalIdentity(a_ident.static_private, a_ident.cert_bytes),
        entropy=os.urandom,
        now_ms=0,
    )
    b = SecureSession(
        initiator=False,
        trust=TrustedState(auth.root_bytes),
        identity=LocalIdentity(b_ident.static_private, b_ident.cert_bytes),
        entropy=os.urandom,
        now_ms=0,
    )
    for src, dst in ((a, b), (b, a), (a, b)):
        for frame in src.frames_to_send():
            dst.receive_frame(frame, 1, T0)
    return a, b


def bench_transport(count: int, repeats: int) -> dict[str, float]:
    message = os.urandom(MESSAGE_BYTES)
    key, nonce = os.urandom(32), bytes(12)
    encrypt = bindings.crypto_aead_chacha20poly1305_ietf_encrypt
    decrypt = bindings.crypto_aead_chacha20poly1305_ietf_decrypt
    sealed = encrypt(message, b"", nonce, key)

    def raw_encrypt() -> float:
        start = time.perf_counter()
        for _ in range(count):
            encrypt(message, b"", nonce, key)
        return time.perf_counter() - start

    def raw_decrypt() -> float:
        start = time.perf_counter()
        for _ in range(count):
            decrypt(sealed, b"", nonce, key)
        return time.perf_counter() - start

    sender, _ = open_pair()
    a, b = open_pair()

    def session_send() -> float:
        start = time.perf_counter()
        for _ in range(count):
            sender.send_message(message)
        return time.perf_counter() - start

    def session_receive() -> float:
        # frames must arrive in nonce order: produce this run's frames untimed, then time the receive
        batches = [a.send_message(message) for _ in range(count)]
        start = time.perf_counter()
        for frames in batches:
            for frame in frames:
                b.receive_frame(frame, 1, T0)
        return time.perf_counter() - start

    # interleave the four measurements so that drift (other load, frequency scaling) hits all alike
    timings: dict[str, list[float]] = {
        "raw_encrypt_s": [],
        "send_s": [],
        "raw_decrypt_s": [],
        "receive_s": [],
    }
    runs = {
        "raw_encrypt_s": raw_encrypt,
        "send_s": session_send,
        "raw_decrypt_s": raw_decrypt,
        "receive_s": session_receive,
    }
    for _ in range(repeats):
        for name, run in runs.items():
            timings[name].append(run())
    results = {name: min(values) for name, values in timings.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    handshakes, messages, repeats = (200, 200, 2) if args.quick else (2000, 3000, 5)

    rate, per_us = bench_handshakes(handshakes, repeats)
    print(
        f"XX handshakes (both ends, certificate verification included): {rate:,.0f}/s "
        f"({per_us:,.0f} us each), goal >= 1,000/s: {'ok' if rate >= 1000 else 'MISSED'}"
    )

    r = bench_transport(messages, repeats)
    mib = messages * MESSAGE_BYTES / (1024 * 1024)
    enc_ratio = r["raw_encrypt_s"] / r["send_s"]
    dec_ratio = r["raw_decrypt_s"] / r["receive_s"]
    print(f"64 KiB messages, {messages} per run:")
    print(f"  raw AEAD encrypt      {mib / r['raw_encrypt_s']:8,.0f} MiB/s")
    print(
        f"  session send_message  {mib / r['send_s']:8,.0f} MiB/s   ratio {enc_ratio:.2f} "
        f"(goal >= 0.8: {'ok' if enc_ratio >= 0.8 else 'MISSED'})"
    )
    print(f"  raw AEAD decrypt      {mib / r['raw_decrypt_s']:8,.0f} MiB/s")
    print(f"  session receive_frame {mib / r['receive_s']:8,.0f} MiB/s   ratio {dec_ratio:.2f}")


if __name__ == "__main__":
    main()
