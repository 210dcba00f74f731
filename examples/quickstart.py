"""Distil the exact velocity field of a 2-D Gaussian mixture into a 2-step GMFlow policy student (~1 min on a CPU).

    python examples/quickstart.py
"""
import torch

import piflow
from piflow.data import make_toy_dataset
from piflow.eval import sliced_wasserstein2
from piflow.models import MLPVelocityModel2D
from piflow.models.students import PolicyStudent

torch.manual_seed(0)
torch.set_num_threads(1)
mixture = make_toy_dataset("ring8").mixture
teacher = piflow.GaussianMixtureTeacher(mixture.means, mixture.std, mixture.weights)   # (x_t, sigma_t, cond) -> u

# Student: an MLP backbone whose output layer is a K=8 Gaussian-mixture head (the policy's parameters).
student = PolicyStudent(MLPVelocityModel2D(hidden_size=256, num_layers=4), "gmflow", num_components=8,
                        init_from_teacher=False, logstd_hidden=256)
pf = piflow.PiFlow(student, teacher, policy="gmflow", nfe=2)
optimizer = torch.optim.Adam(pf.student.parameters(), lr=1e-3)

for step in range(400):
    loss = pf(teacher.sample(256))          # pi-ID loss on forward-diffused data
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 100 == 0:
        print(f"step {step:4d}  loss {loss.item():.4f}")

noise = torch.randn(4000, 2)
reference = teacher.sample(4000)
for nfe in (1, 2, 4):
    print(f"student {nfe} NFE: sliced W2 = {sliced_wasserstein2(pf.sample(noise, nfe=nfe), reference):.3f}")
print(f"teacher Euler 2 NFE: sliced W2 = {sliced_wasserstein2(piflow.euler_sample(teacher, noise, 2), reference):.3f}")
