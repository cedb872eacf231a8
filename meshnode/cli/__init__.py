"""The two command-line tools.

meshctl   (``meshctl.py``: parser and entry point) the operator's tool, its commands in
          ``authority.py`` (authority init/show/rotate-root, node enroll), ``policy.py`` (policy sign,
          cosign, verify, inspect) and ``mesh.py`` (policy publish, status, demo: a running mesh);
meshnode  (``meshnode.py``) run the daemon, check a config, print the ruleset it would apply
          (``render.py``).
``common.py`` holds what both share: the one-line-error parser, the exit codes (0 valid, 1 invalid,
2 usage, 3 unreadable input), output, file reading and opening the key files named with ``--key``.
"""
