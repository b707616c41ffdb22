"""Mixture search with RegMix and data-mixing laws over a swarm of small proxies.

    python -m loam.mixsearch --config loam/configs/regmix.py --workdir runs/regmix
    python -m loam.mixsearch --config loam/configs/regmix.py:proxies=128,target=code --workdir ...
    python -m loam.mixsearch --config loam/configs/regmix.py:runlocal --workdir /tmp/regmix

`proxy` is an ordinary training config (the proxies' model, budget and optimiser); `target` says
what the proposals are for: its model and budget set the epoch caps and go into the written
proposal configs, and, with `validate.seeds > 0`, models of that size are trained on every
proposal and baseline (as one swarm) and compared on the target metric.
"""

import ml_collections

from loam.configs import default

# Miniature sizes for a smoke test; arguments given explicitly win (runlocal,proxies=32).
RUNLOCAL = dict(proxies=16, swarm=8, proxy_size="nano", proxy_steps=6, target_size="nano",
                target_steps=8, target_seq_len=32, target_batch_size=4)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = default.parse_arg(arg, presets={"runlocal": RUNLOCAL}, proxies=64, swarm=16,
                          proxy_size="tiny", proxy_steps=200, target="mean", target_size="midi",
                          target_steps=1200, target_seq_len=256, target_batch_size=16, seeds=0,
                          runlocal=False)
    c = ml_collections.ConfigDict()

    proxy = default.get_config(f"size={a.proxy_size},steps={a.proxy_steps},seq_len=128,"
                               "batch_size=8")
    proxy.optim.lr = 3e-3
    proxy.optim.warmup_steps = max(1, a.proxy_steps // 10)
    proxy.optim.z_loss = 0.0
    proxy.log_every = 25
    proxy.checkpoint_every = 100
    proxy.keep_checkpoints = 1
    proxy.eval_tokens = 16384  # per domain
    proxy.eval_batch_size = 16
    c.proxy = proxy

    c.search = ml_collections.ConfigDict()
    c.search.num_proxies = a.proxies
    c.search.swarm_size = a.swarm        # members trained together in one compiled step
    c.search.seed = 0
    # Dirichlet concentration(s) around the token shares, cycled over the proxies: small values
    # reach the corners of the simplex, large ones stay near the natural mixture.
    c.search.concentration = [0.3, 1.0, 3.0]
    c.search.max_epochs = 4.0            # per domain, over the target run's token budget
    c.search.target = a.target           # "mean" or a domain name (outside the mixture: held out)
    c.search.regressors = ["linear", "lightgbm"]
    c.search.proposal = "lightgbm"       # the regressor whose proposal is RegMix's
    c.search.num_candidates = 100_000
    c.search.top_k = 100
    c.search.holdout_fraction = 0.2
    c.search.baselines = ["uniform", "proportional", "temperature:3"]

    c.target = ml_collections.ConfigDict()
    c.target.size = a.target_size
    c.target.steps = a.target_steps
    c.target.seq_len = a.target_seq_len
    c.target.batch_size = a.target_batch_size
    c.target.lr = 3e-3
    c.target.warmup_steps = max(1, a.target_steps // 12)

    c.validate = ml_collections.ConfigDict()
    c.validate.seeds = a.seeds  # 0: propose only; n: train n seeds of each mixture below
    # Mixtures validated at the target size (names from the report; empty: every one).
    c.validate.mixtures = ["regmix", "mixing_law", "uniform", "proportional"]

    if a.runlocal:  # the sizes above come from RUNLOCAL; these fields have no argument
        c.proxy.optim.warmup_steps = min(2, a.proxy_steps)
        c.proxy.data.seq_len, c.proxy.data.batch_size = 32, 4
        c.proxy.eval_tokens, c.proxy.eval_batch_size = 512, 4
        c.proxy.checkpoint_every = max(1, a.proxy_steps // 2)
        c.search.top_k = 20
        c.target.warmup_steps = min(2, a.target_steps)
    return c
