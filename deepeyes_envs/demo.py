"""The embedded default job: a scripted agent plays synthetic visual-search tasks.

``python -m deepeyes_envs.demo`` resets the env on seeded V*-like tasks, zooms on the right box,
answers, prints one line per episode and writes an HTML transcript of every episode.
``--env visual_code`` plays counting tasks instead, solved by a program run in the code tool.
"""

from __future__ import annotations

import argparse
import os
import time

import gymnasium as gym

from .env import resolve_task_source
from .registry import registered_envs
from .render import HTMLTranscript
from .scripted import scripted_agent


def play(env_name: str, episodes: int, seed: int) -> tuple[list[dict], list[str]]:
    env = gym.make(env_name, render_mode="html")
    tasks = resolve_task_source(gym.spec(env_name).kwargs.get("task_source"))  # the env's own tasks
    rows, pages = [], []
    for episode in range(episodes):
        task = tasks[(seed + episode) % len(tasks)]
        _, reset_info = env.reset(seed=seed + episode, options={"task": task})
        start = time.perf_counter()
        agent = scripted_agent(task, reset_info)
        turn = next(agent)
        while True:
            obs, reward, terminated, truncated, info = env.step(turn)
            if terminated or truncated:
                break
            turn = agent.send(obs)
        parts, summary = info["reward_parts"], info["episode_summary"]
        rows.append({"episode": episode, "task": task.task_id, "size": reset_info["image_size"],
                     "turns": summary["turns"], "answer": parts["answer"], "acc": parts["acc"],
                     "reward": reward, "iou": summary["mean_iou"], "ms": 1000 * (time.perf_counter() - start)})
        pages.append(env.render().body)
    env.close()
    return rows, pages


def print_table(rows: list[dict]) -> None:
    header = ("ep", "task", "image", "turns", "answer", "acc", "reward", "IoU", "ms")
    print("{:>3} {:<14} {:>11} {:>5} {:>6} {:>4} {:>6} {:>5} {:>6}".format(*header))
    for r in rows:
        iou = f"{r['iou']:.2f}" if r["iou"] is not None else "-"
        size = f"{r['size'][0]}x{r['size'][1]}"
        print(f"{r['episode']:>3} {r['task']:<14} {size:>11} {r['turns']:>5} {r['answer']:>6} {r['acc']:>4.0f} "
              f"{r['reward']:>6.2f} {iou:>5} {r['ms']:>6.1f}")
    mean = sum(r["reward"] for r in rows) / len(rows)
    print(f"mean reward {mean:.3f} over {len(rows)} episodes (the maximum is 2.0)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="visual_toolbox_v2", choices=sorted(registered_envs()))
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/demo", help="folder for transcript.html")
    args = parser.parse_args(argv)
    rows, pages = play(args.env, args.episodes, args.seed)
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "transcript.html")
    HTMLTranscript("<hr/>".join(pages), title=f"deepeyes demo: {args.env}").save(path)
    print(f"transcript of every episode: {path}")


if __name__ == "__main__":
    main()
