"""Benchmark: envelope sign/verify throughput vs raw PyNaCl on the same bytes, same run.

Run: .venv/bin/python tests/bench_trust.py
"""

from __future__ import annotations

import statistics
import time

from nacl.signing import SigningKey

from protocol.trust import TrustedState, decode_envelope, signing_message
from simulations.identities import T0, make_authority
from tests.fixtures import sign_sample


def rate(fn, seconds: float = 1.0) -> float:
    n, t0 = 0, time.perf_counter()
    while (el := time.perf_counter() - t0) < seconds:
        for _ in range(50):
            fn()
        n += 50
    return n / el


def main() -> None:
    auth = make_authority()
    data = sign_sample(auth, 1)
    env = decode_envelope(data, "policy")
    msg = signing_message("policy", env.payload)
    sk = SigningKey(auth.seeds["policy"][0])
    vk = sk.verify_key
    sig = sk.sign(msg).signature

    trust = TrustedState(auth.root_bytes)
    rs, es, rv, ev = [], [], [], []
    for _ in range(5):  # interleaved rounds, medians: the machine is shared and noisy
        rs.append(rate(lambda: sk.sign(msg), 0.3))
        es.append(rate(lambda: sign_sample(auth, 1), 0.3))
        rv.append(rate(lambda: vk.verify(msg, sig), 0.3))
        ev.append(rate(lambda: trust.check_policy(data, T0), 0.3))
    raw_sign, env_sign, raw_verify, env_verify = (statistics.median(x) for x in (rs, es, rv, ev))
    print(f"payload {len(env.payload)} bytes")
    print(f"sign:   raw PyNaCl {raw_sign:9.0f}/s   envelope (validate+build+encode+sign) {env_sign:9.0f}/s   ratio {env_sign / raw_sign:.2f}")
    print(f"verify: raw PyNaCl {raw_verify:9.0f}/s   envelope (decode+verify+decode+rules) {env_verify:9.0f}/s   "
          f"ratio {env_verify / raw_verify:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
