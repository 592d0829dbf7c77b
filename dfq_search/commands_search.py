"""``dfq-search run`` (a search campaign) and ``dfq-search report`` (its outputs, rebuilt)."""

from __future__ import annotations

import argparse

from dfq_search.errors import DfqError


def cmd_run(args: argparse.Namespace) -> int:
    from dfq_search.models.preprocessing import given
    from dfq_search.search.campaign import CampaignOptions, run_campaign
    from dfq_search.search.space import load_space, with_model_flags

    for flag in ("trials", "concurrency", "num_cpus", "num_classes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise DfqError(f"--{flag.replace('_', '-')}", value, "an integer >= 1", "pass a positive number")
    if args.time_budget is not None and not args.time_budget > 0:
        raise DfqError("--time-budget", args.time_budget, "seconds > 0", "pass e.g. --time-budget 600")
    if args.sampler is not None:
        from dfq_search.search.space import check_sampler

        check_sampler(args.sampler, "--sampler")
    if args.name is not None and (
        args.name in ("", ".", "..") or any(c in args.name for c in "/\\\0") or args.name != args.name.strip()
    ):
        raise DfqError(
            "bad campaign name", args.name, "one folder name (no '/', not '.' or '..'): the campaign lives "
            "in <storage>/<name>, never outside the storage path", "pass e.g. --name resnet20-w3",
        )  # fmt: skip
    if args.address is not None:  # before any compute: Ray would retry a wrong address for minutes
        from dfq_search.distributed.session import check_address

        check_address(args.address)
    opts = CampaignOptions(
        with_model_flags(load_space(args.space), args.model, given(vars(args))),
        args.model,
        args.weights,
        args.num_classes,
        args.storage,
        args.name,
        args.address,
        args.resume,
        args.time_budget,
        args.trials,
        args.concurrency,
        args.sampler,
        args.val_data,
        args.test_data,
        args.device,
        args.num_cpus,
    )
    from dfq_search.distributed.runner import RayRunner

    run_campaign(opts, lambda line: print(line, flush=True), runner=RayRunner())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dfq_search.distributed.runner import RayRunner
    from dfq_search.search.campaign import finalize
    from dfq_search.search.storage import CampaignStore

    store = CampaignStore.of(args.path)
    if not store.exists():
        raise DfqError(
            "not a campaign folder",
            store.where,
            "a folder (or URI) with campaign.json",
            "pass <storage>/<name> of a 'dfq-search run'",
        )
    store.pull()
    records = RayRunner().records(store.local)
    finalize(store.local, None, records, lambda line: print(line, flush=True), fetch=store.fetch)
    store.push()
    return 0
