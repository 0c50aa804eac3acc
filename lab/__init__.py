"""The length-bias lab: a small policy trained with GRPO, GSPO and LUSPO (all
through ``luspo_rs.policy_loss``) on a task where writing steps makes the
answer right, to see what each loss does to response length.

    python -m lab            # or: make demo
"""
