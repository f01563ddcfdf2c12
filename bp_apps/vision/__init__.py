"""Image classification with backpropagation: data modules for digits, MNIST, Fashion-MNIST, CIFAR-10, folders."""
