"""Checks of the Kubernetes manifests under k8s/ and of the compose files: what no installed tool checks.

`cargo xtask k8s` runs `python -m checks check` (with PYTHONPATH=xtask/k8s) in its venv. Steps, each
counted and printed:
  1. certs      throwaway certificates (the project's own tool) copied into a scratch copy of k8s/
  2. render     `kubectl kustomize` of the bases, every overlay, and every overlay + component
                combination that makes sense (render.py: one certificate source, at most one entry
                point, at most one provider)
  3. schema     every rendered document against the official Kubernetes JSON schemas of several
                minor versions in strict mode, and cert-manager / Gateway API objects against the
                CRD-derived schemas in xtask/k8s/schemas (schema.py)
  4. policy     pod security where it is stricter than checkov, replicas, spread, budgets, labels,
                references between objects (workloads.py); NetworkPolicy reachability (network.py);
                every URL in Klaus's PETRA_URL and the two-cluster name (petra_url.py); a
                provider-neutral base and overlays (provider.py)
  5. contract   ports, probe paths, env var names and shutdown timing against what the binaries
                report (`petra contract`, `klaus contract`) and against docker-compose*.yml (contract.py)
  6. self-test  every check above fails on a deliberate breakage meant for it (selftest.py)

`python -m checks render` writes the same renders (with placeholder certificates) for
`cargo xtask audit`, whose checkov scans them; checkov_cases.py breaks a workload once for each
checkov check that the policy step leaves to it, and the audit proves checkov fails on each.
`python -m checks compose` checks that no compose service but the certs job sees the CA's key
(compose_secrets.py).

Every failure names the rendered combination and the object; the last line of `check` reads
"k8s: N passed, M failed".
"""
