"""``queuegate dlq drop``: one dead letter deleted for good, the others kept in their order,
of a team added the default way (its own broker user) and of one proving itself with an API
key, each with its own ``<ns>.dead.<team>``."""

from __future__ import annotations

from collections.abc import Sequence

from producer import GatewayClient
from queuegate import dlq
from queuegate.settings import Settings
from tests.support import dead_letters, dlq_cli, running_gateway
from tests.teams import TeamIdentity, team_identities

HELLO = [{"role": "user", "content": "Hello there"}]


async def answered_unknown_model(
    identity: TeamIdentity, count: int, job_ids: Sequence[str | None] = ()
) -> list[str]:
    """The job ids of ``count`` jobs of the team (``job_ids`` its own, else the client's)
    naming an alias the catalog lacks: each answered ``unknown_model`` and dead-lettered, a
    letter ``dlq replay`` refuses."""
    ids = []
    async with GatewayClient(identity.settings, **identity.who) as client:  # type: ignore[arg-type]
        for job_id in list(job_ids) or [None] * count:
            result = await client.chat("fixme", HELLO, timeout=10, job_id=job_id)
            assert result.error is not None and result.error.code == "unknown_model"
            ids.append(result.job_id)
    return ids


async def ids_left(settings: Settings) -> list[str | None]:
    return [letter.message_id for letter in (await dlq.peek(settings))[0]]


async def test_drop_deletes_one_letter_of_either_kind_of_team_and_keeps_the_rest_in_order(
    settings: Settings,
) -> None:
    async with (
        team_identities(settings) as teams,
        running_gateway(settings, teams=("alpha", "beta")),
    ):
        # Given two letters of alpha (its own broker user) and two of beta (an API key), each
        # answered unknown_model as it died, which replay refuses
        alpha_first, alpha_second = await answered_unknown_model(teams["alpha"], 2)
        beta_first, beta_second = await answered_unknown_model(teams["beta"], 2)
        await dead_letters(settings, 4)
        before = await ids_left(settings)
        assert sorted(map(str, before)) == sorted(
            [alpha_first, alpha_second, beta_first, beta_second]
        )
        _, refused = await dlq.replay(settings, {alpha_first})
        assert [letter.message_id for letter, _ in refused] == [alpha_first]

        # When the operator drops alpha's first, then beta's second
        stdout, _ = await dlq_cli(settings, "drop", alpha_first)
        dropped = await dlq.drop(settings, beta_second)

        # Expect each said, and only those two gone: the others there, in their order
        assert f"dropped {alpha_first} (unknown_model, from alpha)" in stdout
        assert [(x.message_id, x.team) for x in dropped] == [(beta_second, "beta")]
        assert await ids_left(settings) == [
            x for x in before if x not in (alpha_first, beta_second)
        ]


async def test_drop_refuses_an_id_no_letter_has_in_one_line_and_deletes_nothing(
    settings: Settings,
) -> None:
    async with (
        team_identities(settings) as teams,
        running_gateway(settings, teams=("alpha", "beta")),
    ):
        # Given a letter of each team
        [alpha_job] = await answered_unknown_model(teams["alpha"], 1)
        [beta_job] = await answered_unknown_model(teams["beta"], 1)
        await dead_letters(settings, 2)
        before = await ids_left(settings)

        # When the operator drops an id no letter has, and a prefix of one (not its id)
        missing = await dlq_cli(settings, "drop", "no-such-job", exit_code=1)
        prefix = await dlq_cli(settings, "drop", beta_job[:8], exit_code=1)

        # Expect each refused in one line naming it, and every letter kept, in its order
        assert missing[1].strip() == (
            "error: no dead letter has the id 'no-such-job' (give it whole): list them with "
            "queuegate dlq list"
        )
        assert f"no dead letter has the id {beta_job[:8]!r}" in prefix[1]
        assert await ids_left(settings) == before
        assert sorted(map(str, before)) == sorted([alpha_job, beta_job])


async def test_reading_and_a_refused_drop_keep_twelve_letters_in_their_order(
    settings: Settings,
) -> None:
    async with (
        team_identities(settings) as teams,
        running_gateway(settings, teams=("alpha",)),
    ):
        # Given twelve letters in alpha's queue (past ten, where returning them all at once
        # put them back out of order)
        ids = [f"order-{i}" for i in range(12)]
        await answered_unknown_model(teams["alpha"], len(ids), ids)
        await dead_letters(settings, len(ids))

        # When the operator lists them, shows one, replays one (refused), drops one no
        # letter has, and lists them again
        first = await ids_left(settings)
        await dlq_cli(settings, "show", ids[5])
        _, refused = await dlq.replay(settings, {ids[3]})
        await dlq_cli(settings, "drop", "order-none", exit_code=1)
        await dlq.drop(settings, ids[7])

        # Expect them in the order they died each time, the one dropped gone
        assert first == ids
        assert [letter.message_id for letter, _ in refused] == [ids[3]]
        assert await ids_left(settings) == [x for x in ids if x != ids[7]]


async def test_drop_of_an_id_two_teams_chose_takes_their_team_and_deletes_one_letter(
    settings: Settings,
) -> None:
    async with (
        team_identities(settings) as teams,
        running_gateway(settings, teams=("alpha", "beta")),
    ):
        # Given one job id chosen by alpha (its broker user) and by beta (an API key)
        await answered_unknown_model(teams["alpha"], 1, ["shared-id"])
        await answered_unknown_model(teams["beta"], 1, ["shared-id"])
        await dead_letters(settings, 2)

        # When the operator drops it without naming a team, then with each team in turn
        ambiguous = await dlq_cli(settings, "drop", "shared-id", exit_code=1)
        kept = [(x.message_id, x.team) for x in (await dlq.peek(settings))[0]]
        stdout, _ = await dlq_cli(settings, "drop", "shared-id", "--team", "beta")
        after_beta = [(x.message_id, x.team) for x in (await dlq.peek(settings))[0]]
        dropped = await dlq.drop(settings, "shared-id", team="alpha")

        # Expect the first refused in one line naming both teams, nothing deleted; then
        # each drop deleting its team's letter only
        assert ambiguous[1].strip() == (
            "error: dead letters of 2 teams have the id 'shared-id' (alpha, beta): "
            "name one with --team"
        )
        assert sorted(kept, key=str) == [("shared-id", "alpha"), ("shared-id", "beta")]
        assert "dropped shared-id (unknown_model, from beta)" in stdout
        assert after_beta == [("shared-id", "alpha")]
        assert [(x.message_id, x.team) for x in dropped] == [("shared-id", "alpha")]
        assert await ids_left(settings) == []


async def test_drop_is_in_the_dlq_help(settings: Settings) -> None:
    # When an operator asks what dlq does, and what drop does
    listing = await dlq_cli(settings, "--help")
    told = await dlq_cli(settings, "drop", "--help")
    # Expect drop among the commands, saying it deletes one letter and keeps the others
    assert "drop" in listing[0]
    assert "Delete one dead letter for good" in " ".join(told[0].split())
